"""Which `peft_method` each training stage accepts: the adapter x stage matrix.

Combinations known not to train are refused when the recipe is parsed (before any weights load), with
the reason, instead of failing inside TRL or PEFT. tests/test_method_matrix.py runs every combination for
one step on a tiny model and keeps this table and the README's matrix honest.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

_PPO_ROLES = ("PPO's one base model switches its policy, value, reward and reference roles by adapter; "
              "only lora, dora, qlora and ia3 adapters (or full) can be switched that way")

REFUSED: dict[tuple[str, str], str] = {
    ("rm", "prefix"): "prefix tuning needs past key values, which PEFT's sequence-classification model does not "
                      "pass; use prompt, lora or ia3 for a reward model",
    ("orpo", "prompt"): "TRL's ORPO trainer scores the logits against labels without the virtual tokens prompt "
                        "tuning prepends (their lengths differ); use prefix, lora or ia3",
    ("ppo", "prefix"): _PPO_ROLES,
    ("ppo", "prompt"): _PPO_ROLES,
    ("ppo", "adapters"): _PPO_ROLES,
}


def check_method(stage: str, method: str, where: str, model_name_or_path: str | None = None) -> None:
    """Refuse a combination of stage and peft_method that is known not to train (ConfigError, exit 2).

    A starting model that is an earlier stage's prefix, prompt or bottleneck adapter is trained further
    with its own method (policy.build_policy), so that method is the one checked."""
    from .policy import MERGEABLE, _method_of, adapter_config

    acfg = adapter_config(model_name_or_path) if model_name_or_path and Path(model_name_or_path).is_dir() else None
    peft_type = str(acfg.get("peft_type", "")).upper() if acfg else ""
    if peft_type and peft_type not in MERGEABLE:
        adapter = _method_of(peft_type)
        reason = REFUSED.get((stage, adapter))
        if reason:
            raise ConfigError(f"{where}: model_name_or_path: {model_name_or_path} holds a {adapter} adapter, which is "
                              f"trained further with peft_method: {adapter}, and that is not supported by the {stage} "
                              f"stage: {reason}")
        return
    reason = REFUSED.get((stage, method))
    if reason:
        raise ConfigError(f"{where}: peft_method: {method} is not supported by the {stage} stage: {reason}")
