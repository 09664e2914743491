"""Reward plumbing shared by PPO, GRPO and RLOO: a reward-model stage output and/or rule rewards, weighted.

Recipe keys (see config.RewardFields): `reward_model: PATH` (loaded with reward.model.load_reward_model,
which refuses a model whose score head would be newly initialised) and `reward: SPEC` (reward.rules.build_reward:
'demo_verifier', {regex: ...}, {length: ...}, {verifier: module:function}, or a list of these with `weight`s).
"""
from __future__ import annotations

from ..errors import ConfigError


def _required(cfg) -> None:
    if not cfg.reward_model and not cfg.reward:
        raise ConfigError("reward_model or reward: required (a reward-model stage output, and/or a rule reward spec "
                          "such as 'demo_verifier')")


def rule_parts(spec) -> list[tuple[str, object, float]]:
    """(name, reward, weight) for each entry of a rule spec (a list gives one part per entry)."""
    from reward.rules import KINDS, build_reward

    if spec is None:
        return []
    entries = spec if isinstance(spec, (list, tuple)) else [spec]
    parts = []
    for i, entry in enumerate(entries):
        where = f"reward[{i}]" if isinstance(spec, (list, tuple)) else "reward"
        weight = 1.0
        if isinstance(entry, dict) and "weight" in entry:
            weight = entry["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"{where}: weight must be a number, got {weight!r}")
            entry = {k: v for k, v in entry.items() if k != "weight"}
        name = next((k for k in KINDS if isinstance(entry, dict) and k in entry), None) or (
            entry if isinstance(entry, str) and len(entry) < 40 else f"rule{i}")
        name = str(name) if all(n != name for n, _, _ in parts) else f"{name}{i}"  # TRL logs by name
        parts.append((name, build_reward(entry, _where=where), float(weight)))
    return parts


def load_separate_reward_model(path: str, *, device, batch_size: int = 16):
    from reward.model import load_reward_model

    return load_reward_model(path, device=device, batch_size=batch_size)


class EnsembleReward:
    """Several reward models as one: the mean, or the minimum (pessimistic: a response must please every
    model), of their scores for each response. An ensemble is harder to exploit than any one member."""

    def __init__(self, members, reduce: str = "mean"):
        if reduce not in ("mean", "min"):
            raise ConfigError(f"reward_ensemble: must be mean or min, got {reduce!r}")
        self.members, self.reduce = list(members), reduce

    def score(self, prompts, responses) -> list[float]:
        columns = [m.score(list(prompts), list(responses)) for m in self.members]
        rows = list(zip(*columns))
        return [min(r) if self.reduce == "min" else sum(r) / len(r) for r in rows]


def with_ensemble(cfg, reward_model, *, device):
    """`reward_model` alone, or an EnsembleReward of it and the recipe's further reward models."""
    extra = list(getattr(cfg, "extra_reward_models", None) or [])
    if not extra:
        return reward_model
    members = [reward_model] + [load_separate_reward_model(p, device=device, batch_size=cfg.reward_batch_size) for p in extra]
    return EnsembleReward(members, cfg.reward_ensemble)


def build_gold_judge(cfg):
    """The gold judge (`gold_judge`: a rule spec or a reward-model dir), or None when the recipe gives none."""
    from reward.rules import build_reward

    if cfg.gold_judge in (None, "", [], {}):
        return None
    return build_reward(cfg.gold_judge, _where="gold_judge")


def combine(cfg, reward_model=None, *, device=None):
    """One object with .score(prompts, responses): the reward model's score (weighted) plus the rule parts."""
    from reward.rules import CombinedReward

    _required(cfg)
    parts = [(r, w) for _, r, w in rule_parts(cfg.reward)]
    if cfg.reward_model:
        if reward_model is None:
            raise ConfigError("reward_model: the reward model was not loaded")
        parts.insert(0, (with_ensemble(cfg, reward_model, device=device), float(cfg.reward_model_weight)))
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return CombinedReward(parts)


def trl_reward_funcs(cfg, *, device) -> tuple[list, list[float], list]:
    """For GRPOTrainer/RLOOTrainer: (reward_funcs, reward_weights, loaded reward models)."""
    from reward.rules import as_trl_reward_func

    _required(cfg)
    funcs, weights, models = [], [], []
    if cfg.reward_model:
        rm = load_separate_reward_model(cfg.reward_model, device=device, batch_size=cfg.reward_batch_size)
        models.append(rm)
        funcs.append(as_trl_reward_func(with_ensemble(cfg, rm, device=device), name="reward_model"))
        weights.append(float(cfg.reward_model_weight))
    for name, r, w in rule_parts(cfg.reward):
        funcs.append(as_trl_reward_func(r, name=name))
        weights.append(w)
    return funcs, weights, models
