"""PPOConfig: transformers.TrainingArguments plus the PPO keys, checked in __post_init__.

Batch vocabulary (per process):
    rollout_batch_size    prompts generated and scored per PPO update
    per_device_train_batch_size x gradient_accumulation_steps = one optimiser step's samples
    num_ppo_epochs        passes over each rollout batch
Training length: `max_steps` PPO updates if > 0, else `num_train_epochs` passes over the prompts.
Checkpoints: save_strategy "steps" every `save_steps` updates, "epoch" after each pass over the prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..config import json_or_value
from ..errors import ConfigError
from .engines import EngineFields

VALUE_MODELS = ("auto", "reward", "policy")
KL_ESTIMATORS = ("k1", "k3")


def parse_reward_spec(spec):
    """Recipe YAML gives lists/dicts; the command line gives strings (JSON accepted)."""
    return json_or_value(spec, "reward")


@dataclass
class RewardFields:
    """Where the reward comes from; shared by PPO, GRPO and RLOO."""

    reward_model: str | None = field(default=None, metadata={"help": "A reward-model stage output (full or LoRA SEQ_CLS); its head must load."})
    reward: str | None = field(default=None, metadata={"help": "Rule reward spec: 'demo_verifier', {regex: ...}, {length: ...}, a list with weights, a JSON/YAML file."})
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of the reward model's score when rules are added to it."})
    reward_batch_size: int = field(default=16, metadata={"help": "Sequences per reward-model forward pass."})


@dataclass
class PPOConfig(TrainingArguments, EngineFields):
    """PPO (InstructGPT-style RLHF) on top of TrainingArguments (optimiser, precision, saving, logging)."""

    # defaults that suit PPO better than TrainingArguments'
    learning_rate: float = field(default=1.0e-5, metadata={"help": "AdamW learning rate (policy and value)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training prompts (unless max_steps > 0)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per PPO micro-batch."})
    # reward
    reward_model: str | None = field(default=None, metadata={"help": "A reward-model stage output (full or LoRA SEQ_CLS)."})
    reward: str | None = field(default=None, metadata={"help": "Rule reward spec (see reward.rules.build_reward); added to the reward model's score."})
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of the reward model's score."})
    reward_batch_size: int = field(default=16, metadata={"help": "Sequences per reward-model forward pass."})
    score_clip: float | None = field(default=None, metadata={"help": "Clip the sequence score to [-score_clip, score_clip]."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of responses that end without EOS."})
    value_model: str = field(default="auto", metadata={"help": "Value model start: reward (the reward model's weights and head), policy, or auto (reward when possible)."})
    # rollouts
    rollout_batch_size: int = field(default=16, metadata={"help": "Prompts per PPO update per process."})
    max_prompt_length: int = field(default=256, metadata={"help": "Prompt tokens kept (longer prompts are trimmed from the start, counted)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Response tokens generated at most."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use the same temperature)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1.0 = off; off keeps sampler and log-probs consistent)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    # PPO
    num_ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs over each rollout batch."})
    kl_coef: float = field(default=0.05, metadata={"help": "Per-token KL penalty coefficient (initial value if adaptive)."})
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator in the reward: k1 (log ratio) or k3."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef towards kl_target (Ziegler et al. 2019)."})
    kl_target: float = field(default=6.0, metadata={"help": "Target KL (nats per response) of the adaptive controller."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (samples) of the adaptive controller."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    # held-out evaluation
    eval_do_sample: bool = field(default=False, metadata={"help": "Sample held-out responses (default: greedy, deterministic)."})

    def __post_init__(self):
        self.reward = parse_reward_spec(self.reward)
        super().__post_init__()
        self.check_engine_fields()  # the rollout engine's keys (TRL's GRPO names): engines.EngineFields
        c = self
        if c.value_model not in VALUE_MODELS:
            raise ConfigError(f"value_model: must be one of {', '.join(VALUE_MODELS)}, got {c.value_model!r}")
        if c.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator: must be k1 or k3, got {c.kl_estimator!r}")
        positive = dict(rollout_batch_size=c.rollout_batch_size, max_new_tokens=c.max_new_tokens,
                        max_prompt_length=c.max_prompt_length, num_ppo_epochs=c.num_ppo_epochs,
                        temperature=c.temperature, cliprange=c.cliprange, cliprange_value=c.cliprange_value,
                        reward_batch_size=c.reward_batch_size, kl_target=c.kl_target, kl_horizon=c.kl_horizon)
        for key, v in positive.items():
            if not v > 0:
                raise ConfigError(f"{key}: must be positive, got {v}")
        if not 0.0 < c.top_p <= 1.0:
            raise ConfigError(f"top_p: must be in (0, 1], got {c.top_p}")
        if c.top_k < 0:
            raise ConfigError(f"top_k: must be 0 (off) or positive, got {c.top_k}")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(c, key) <= 1.0:
                raise ConfigError(f"{key}: must be in [0, 1], got {getattr(c, key)}")
        if c.kl_coef < 0 or c.vf_coef < 0:
            raise ConfigError("kl_coef and vf_coef: must not be negative")
        if c.adaptive_kl and c.kl_coef == 0:  # the controller's multiplicative update can never leave 0
            raise ConfigError("adaptive_kl: needs a positive starting kl_coef (got kl_coef: 0)")
        mini = c.per_device_train_batch_size * c.gradient_accumulation_steps
        if c.rollout_batch_size % mini:
            raise ConfigError(f"rollout_batch_size ({c.rollout_batch_size}) must be a multiple of per_device_train_batch_size "
                              f"x gradient_accumulation_steps ({c.per_device_train_batch_size} x {c.gradient_accumulation_steps} = {mini})")
        if c.score_clip is not None and c.score_clip <= 0:
            raise ConfigError(f"score_clip: must be positive, got {c.score_clip}")
        if c.missing_eos_penalty is not None and c.missing_eos_penalty < 0:
            raise ConfigError(f"missing_eos_penalty: a penalty is subtracted, give a non-negative number, got {c.missing_eos_penalty}")

    @property
    def minibatch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps
