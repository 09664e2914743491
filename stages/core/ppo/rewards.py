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


def combine(cfg, reward_model=None):
    """One object with .score(prompts, responses): the reward model's score (weighted) plus the rule parts."""
    from reward.rules import CombinedReward

    _required(cfg)
    parts = [(r, w) for _, r, w in rule_parts(cfg.reward)]
    if cfg.reward_model:
        if reward_model is None:
            raise ConfigError("reward_model: the reward model was not loaded")
        parts.insert(0, (reward_model, float(cfg.reward_model_weight)))
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
        funcs.append(as_trl_reward_func(rm, name="reward_model"))
        weights.append(float(cfg.reward_model_weight))
    for name, r, w in rule_parts(cfg.reward):
        funcs.append(as_trl_reward_func(r, name=name))
        weights.append(w)
    return funcs, weights, models
