"""Guards against reward over-optimization (Gao et al. 2022), shared by PPO, GRPO and RLOO.

A policy trained on a proxy reward (a reward model) learns to please the proxy; past some KL the behaviour
that matters (the "gold" signal: a verifier, a rule, a second reward model) gets worse while the proxy still
rises. The guards here:
- GoldTracker: follows the periodic held-out evaluations (gold score beside the held-out training reward),
  remembers the best one by the gold score (ties: the higher training reward; the start counts), and says
  when to stop: the gold score stayed below its best for `patience` evaluations in a row while the training
  reward rose above its value at the best.
- start_statistics / shape_scores: the reward normalised against the starting (SFT) policy's own samples,
  and a length-aware penalty on drifting away from the starting policy's response length.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

EVAL_KEYS = ("heldout_reward", "gold_score", "kl_to_reference", "response_length")


def eval_entry(step: int, held: dict) -> dict:
    """A log-history entry with the agreed names from a held-out evaluation ({mean_reward, gold_score, ...})."""
    out = {"step": int(step), "heldout_reward": held.get("mean_reward"), "gold_score": held.get("gold_score"),
           "kl_to_reference": held.get("kl_to_reference"), "response_length": held.get("mean_length")}
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class GoldTracker:
    patience: int = 3
    best: dict | None = None
    start: dict | None = None
    bad: int = 0  # evaluations in a row with the gold score below its best while the training reward rose
    evaluations: int = 0
    stopped: str | None = None
    history: list = field(default_factory=list)

    @staticmethod
    def _key(entry: dict) -> tuple:
        return (entry["gold_score"], entry.get("heldout_reward", -math.inf))

    def observe(self, entry: dict) -> bool:
        """Record one evaluation (needs gold_score; heldout_reward optional); True when it is the new best."""
        self.evaluations += 1
        self.history.append({k: entry[k] for k in ("step", "gold_score", "heldout_reward") if k in entry})
        if self.best is None:
            self.best, self.start, self.bad = dict(entry), dict(entry), 0
            return True
        if self._key(entry) > self._key(self.best):
            self.best, self.bad = dict(entry), 0
            return True
        reward_rose = entry.get("heldout_reward", -math.inf) > self.best.get("heldout_reward", math.inf)
        self.bad = self.bad + 1 if entry["gold_score"] < self.best["gold_score"] and reward_rose else 0
        if self.patience and self.bad >= self.patience and self.stopped is None:
            self.stopped = (f"gold score below its best ({self.best['gold_score']:.4f} at step {self.best['step']}) for "
                            f"{self.bad} evaluations while the held-out training reward rose")
        return False

    @property
    def should_stop(self) -> bool:
        return self.stopped is not None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in (state or {}).items():
            setattr(self, k, v)

    def summary(self) -> dict:
        return {"best_step": (self.best or {}).get("step"), "best_gold_score": (self.best or {}).get("gold_score"),
                "start_gold_score": (self.start or {}).get("gold_score"), "evaluations": self.evaluations,
                "stopped_early": self.stopped, "history": list(self.history)}


def start_statistics(raw: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Mean/std of the starting policy's scores and its mean response length (std 1 when the scores are constant)."""
    raw, lengths = raw.double(), lengths.double()
    std = float(raw.std()) if raw.numel() > 1 else 0.0
    return {"mean": float(raw.mean()), "std": std if std > 1e-6 else 1.0, "length": max(1.0, float(lengths.mean())),
            "samples": int(raw.numel())}


def shape_scores(raw: torch.Tensor, lengths: torch.Tensor | None, stats: dict | None, *, normalization: str = "none",
                 length_penalty: float = 0.0) -> torch.Tensor:
    """The training score: normalised against the start policy's statistics, minus the length-drift penalty."""
    scores = raw.clone()
    if not stats:
        return scores
    if normalization == "start":
        scores = (scores - stats["mean"]) / stats["std"]
    if length_penalty and lengths is not None:
        drift = (lengths.to(scores.dtype) - stats["length"]).abs() / stats["length"]
        scores = scores - length_penalty * drift
    return scores
