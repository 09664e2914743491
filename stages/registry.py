"""The stage registry: one entry per stage, read by `rlhf` (cli), chains, `rlhf plan`, export and model cards.

Entries name their classes as "module:Class" strings and are imported only when used, so `rlhf --help`
stays instant. Adding a stage is one module in stages/ (a linear `main()` through
stages/core/lifecycle.StageRun) plus one entry here; see the README's "Adding a stage".
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from .core.errors import ConfigError


@dataclass(frozen=True)
class StageSpec:
    name: str
    help: str
    config: str | None  # "module:Class" of the training config (None: the stage parses its own flags)
    data_task: str | None  # stages/core/data.py task the stage's rows are validated for
    encoder: str | None  # "module:function" that tokenises the rows with the suite's truncation rule
    model_task: str | None  # causal_lm | seq_cls: what the stage's output loads as
    trainer: str | None  # "module:Class" that trains it
    metrics: tuple[str, ...] = ()  # the metrics the stage reports (model card, chain table)
    kind: str = "training"  # training | evaluation
    plan_profile: str | None = None  # memory profile `rlhf plan` uses: sft, rm or dpo
    data_loader: str | None = None  # "module:function(args)" for rows data.py does not read (classification)

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    def config_class(self):
        return load(self.config)

    def trainer_class(self):
        return load(self.trainer)


def load(ref: str):
    """Import "module:Class" (TRL's experimental trainers print a warning on import: silenced)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


_PREF = ("rewards/accuracies", "rewards/margins", "loss")
STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("sft", "supervised fine-tuning stage (same flags as stages/sft.py)", "trl:SFTConfig", "sft",
              "stages.core.encode:encode_sft", "causal_lm", "trl:SFTTrainer", ("loss",), plan_profile="sft"),
    StageSpec("rm", "reward-model stage on preference pairs", "trl:RewardConfig", "preference",
              "stages.core.encode:encode_preference", "seq_cls", "trl:RewardTrainer", ("accuracy", "margin"),
              plan_profile="rm"),
    StageSpec("dpo", "DPO stage (and its loss family: ipo, hinge, robust, ...)", "trl:DPOConfig", "preference",
              "stages.core.encode:encode_preference", "causal_lm", "trl:DPOTrainer", _PREF, plan_profile="dpo"),
    StageSpec("kto", "KTO stage on unpaired preference data", "trl:KTOConfig", "unpaired",
              None, "causal_lm", "trl:KTOTrainer", _PREF),
    StageSpec("orpo", "ORPO stage (reference-free)", "trl.experimental.orpo:ORPOConfig", "preference", None,
              "causal_lm", "trl.experimental.orpo:ORPOTrainer", _PREF),
    StageSpec("cpo", "CPO stage (reference-free; loss_type simpo is SimPO)", "trl.experimental.cpo:CPOConfig",
              "preference", None, "causal_lm", "trl.experimental.cpo:CPOTrainer", _PREF),
    StageSpec("ppo", "PPO stage (reward model and/or rule rewards; one base, four roles with LoRA)",
              "stages.core.ppo.config:PPOConfig", "prompt", None, "causal_lm", "stages.core.ppo.trainer:PPOTrainer",
              ("mean_reward", "kl_to_reference")),
    StageSpec("grpo", "GRPO stage (TRL GRPOTrainer) with reward model and/or rule rewards",
              "stages.core.ppo.online:GRPOStageConfig", "prompt", None, "causal_lm", "trl:GRPOTrainer", ("mean_reward",)),
    StageSpec("rloo", "RLOO stage (TRL RLOOTrainer) with reward model and/or rule rewards",
              "stages.core.ppo.online:RLOOStageConfig", "prompt", None, "causal_lm", "trl:RLOOTrainer", ("mean_reward",)),
    StageSpec("online_dpo", "online DPO stage (TRL OnlineDPOTrainer): sampled pairs ranked by reward model and/or rules",
              "stages.core.ppo.online_dpo:OnlineDPOStageConfig", "prompt", None, "causal_lm",
              "trl.experimental.online_dpo:OnlineDPOTrainer", ("mean_reward",)),
    StageSpec("classify", "classification fine-tuning with your label taxonomy (single- or multi-label)",
              "stages.classify:ClassifyConfig", "classification", "stages.core.classify_model:encode_classification",
              "seq_cls", "transformers:Trainer", ("macro_f1", "micro_f1", "accuracy", "ece"), plan_profile="rm",
              data_loader="stages.classify:load_rows"),
    StageSpec("evaluate", "win-rate evaluation stage (as winrate, --out required; used by chains)", None, "prompt",
              None, None, None, ("win_rate", "tie_rate", "lc_win_rate"), kind="evaluation"),
)}


def get(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, STAGES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown stage '{name}'{hint}; stages: {', '.join(STAGES)}") from None


def names(kind: str | None = None) -> list[str]:
    return [n for n, s in STAGES.items() if kind is None or s.kind == kind]


def model_task_of_manifest(manifest: dict | None) -> str | None:
    """What a stage output loads as, from its manifest's stage (None when not a suite output)."""
    spec = STAGES.get((manifest or {}).get("stage") or "")
    return spec.model_task if spec else None
