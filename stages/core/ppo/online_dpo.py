"""Online DPO's config: TRL's experimental OnlineDPOConfig plus the suite's reward keys.

The stage's flow is GRPO/RLOO's (stages/core/ppo/online.py): the same reward plumbing (reward-model stage
output and/or weighted rule rewards, each one TRL reward function) and the same greedy held-out reward
before and after. OnlineDPOTrainer samples two completions per prompt, ranks them with the weighted
rewards and takes a DPO step on the pair. Reference: with a fresh adapter, the adapter-disabled model
(the SFT policy when starting from an SFT output); full fine-tuning gets TRL's frozen copy of the model
as loaded (a merged SFT adapter included). Kept apart from online.py so GRPO/RLOO never import
trl.experimental.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.online_dpo import OnlineDPOConfig  # noqa: E402

from .config import RewardFields, check_gold_fields, parse_reward_spec, split_reward_models  # noqa: E402


@dataclass
class OnlineDPOStageConfig(OnlineDPOConfig, RewardFields):
    """Module-level (TRL pickles its args into checkpoints)."""

    def __post_init__(self):
        self.reward = parse_reward_spec(self.reward)
        split_reward_models(self)  # reward_model: [a, b] is an ensemble, as in GRPO/RLOO
        check_gold_fields(self)
        super().__post_init__()
