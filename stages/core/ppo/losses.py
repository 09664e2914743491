"""The PPO mathematics, free of models: masked statistics, KL estimators, GAE, clipped losses, KL control.

Shapes: (batch, response_len) tensors with a 0/1 float `mask` over real response tokens.
References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 and
Ouyang et al. 2022 (per-token KL penalty, adaptive KL coefficient), Schulman 2020 ("Approximating
KL divergence": the k1/k3 estimators).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# -- masked statistics -------------------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over the positions where mask is 1 (0 when the mask is empty)."""
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions; masked-out positions are returned as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# -- token log-probabilities ---------------------------------------------------------------------------
def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits); logits (B, T, V), tokens (B, T) -> (B, T), in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, (B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_full(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) per position over the whole vocabulary, (B, T, V) x 2 -> (B, T)."""
    lp, lq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


# -- KL estimators (per sampled token, x ~ p) -----------------------------------------------------------
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) - log q(x): unbiased for KL(p||q), high variance, can be negative per token."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = q(x)/p(x): unbiased, low variance, never negative."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def kl_estimate(logp, ref_logp, estimator: str = "k1") -> torch.Tensor:
    if estimator == "k1":
        return kl_k1(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


# -- rewards, advantages, returns ------------------------------------------------------------------
def per_token_rewards(scores, logp, ref_logp, mask, kl_coef: float, estimator: str = "k1"):
    """InstructGPT reward: -kl_coef * KL_t at every response token, + the score at the last real token.

    Returns (rewards, kl) with kl the per-token estimate (masked)."""
    kl = kl_estimate(logp, ref_logp, estimator) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over each response, right-padded by `mask`.

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last real token is 0);
    A_t = delta_t + gamma * lam * A_{t+1};  returns R_t = A_t + V_t. Returns (advantages, returns)."""
    values = values * mask
    T = rewards.shape[-1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_v = next_v * (mask[:, t + 1] if t + 1 < T else 0.0)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0.0)
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


# -- losses ----------------------------------------------------------------------------------------
def policy_loss(logp, old_logp, advantages, mask, cliprange: float):
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-e, 1+e)), r = exp(logp - old_logp).

    Returns (loss, stats) with clipfrac (share of tokens where the clipped term won) and approx_kl,
    the k3 estimate of KL(rollout policy || current policy) on the rollout's own samples."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl, "ratio": masked_mean(ratio.detach(), mask)}


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """0.5 * mean over tokens of max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -c, c)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((l2 > l1).float(), mask)
    return loss, {"vf_clipfrac": clipfrac}


# -- KL coefficient control ------------------------------------------------------------------------
@dataclass
class KLController:
    """Fixed coefficient, or Ziegler et al.'s adaptive one:
    e = clip(KL / target - 1, -0.2, 0.2);  coef *= 1 + e * n_samples / horizon."""

    value: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, current_kl: float, n_samples: int) -> float:
        if self.adaptive and math.isfinite(current_kl):
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
