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
ENSEMBLE_REDUCTIONS = ("mean", "min")
MAX_KL_ACTIONS = ("stop", "raise_kl_coef")
REWARD_NORMALIZATIONS = ("none", "start")


def parse_reward_spec(spec):
    """Recipe YAML gives lists/dicts; the command line gives strings (JSON accepted)."""
    return json_or_value(spec, "reward")


def split_reward_models(cfg) -> None:
    """`reward_model: [a, b, ...]` is an ensemble: the first stays `reward_model` (it may share the policy's
    base), the others are kept in `extra_reward_models`; `reward_ensemble` says how their scores combine."""
    value = json_or_value(cfg.reward_model, "reward_model")
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"reward_model: a path or a non-empty list of paths, got {value!r}")
        value, cfg.extra_reward_models = value[0], list(value[1:])
    else:
        cfg.extra_reward_models = []
    cfg.reward_model = value
    if cfg.reward_ensemble not in ENSEMBLE_REDUCTIONS:
        raise ConfigError(f"reward_ensemble: must be mean or min, got {cfg.reward_ensemble!r}")


def check_gold_fields(cfg) -> None:
    cfg.gold_judge = json_or_value(cfg.gold_judge, "gold_judge")
    if cfg.gold_eval_steps < 0 or cfg.gold_patience < 0:
        raise ConfigError("gold_eval_steps and gold_patience: must not be negative")


@dataclass
class GoldFields:
    """The held-out gold signal during RL (PPO, GRPO, RLOO): a judge that is not the training reward."""

    gold_judge: str | None = field(default=None, metadata={"help": "Judge that is NOT the training reward, scored on held-out prompts: a rule reward spec ('demo_verifier', {regex: ...}, ...) or a second reward-model dir."})
    gold_eval_steps: int = field(default=0, metadata={"help": "Evaluate every N updates on the held-out prompts: training reward, gold score, KL, length (0 = off)."})
    gold_patience: int = field(default=3, metadata={"help": "Stop when the gold score stayed below its best for K evaluations in a row while the held-out training reward rose above its value there (0 = never)."})
    gold_select_best: bool = field(default=True, metadata={"help": "The stage's output is the evaluated policy (the start included) with the best gold score."})


@dataclass
class RewardFields(GoldFields):
    """Where the reward comes from; shared by PPO, GRPO and RLOO."""

    reward_model: str | None = field(default=None, metadata={"help": "A reward-model stage output (full or LoRA SEQ_CLS), or a list of them (an ensemble); its head must load."})
    reward_ensemble: str = field(default="mean", metadata={"help": "How several reward models' scores combine: mean or min."})
    reward: str | None = field(default=None, metadata={"help": "Rule reward spec: 'demo_verifier', {regex: ...}, {length: ...}, a list with weights, a JSON/YAML file."})
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of the reward model's score when rules are added to it."})
    reward_batch_size: int = field(default=16, metadata={"help": "Sequences per reward-model forward pass."})


@dataclass
class PPOConfig(TrainingArguments, GoldFields, EngineFields):
    """PPO (InstructGPT-style RLHF) on top of TrainingArguments (optimiser, precision, saving, logging)."""

    # defaults that suit PPO better than TrainingArguments'
    learning_rate: float = field(default=1.0e-5, metadata={"help": "AdamW learning rate (policy and value)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training prompts (unless max_steps > 0)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per PPO micro-batch."})
    # reward
    reward_model: str | None = field(default=None, metadata={"help": "A reward-model stage output (full or LoRA SEQ_CLS), or a list of them (an ensemble)."})
    reward_ensemble: str = field(default="mean", metadata={"help": "How several reward models' scores combine: mean or min (the pessimistic one)."})
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
    # guards against reward over-optimization
    max_kl: float | None = field(default=None, metadata={"help": "KL limit (nats per response, rollout mean): past it, stop or raise kl_coef (max_kl_action)."})
    max_kl_action: str = field(default="stop", metadata={"help": "What passing max_kl does: stop (the best checkpoint by gold is kept) or raise_kl_coef (x1.5 each time)."})
    reward_normalization: str = field(default="none", metadata={"help": "start: scores become (score - mean) / std with the mean/std of the starting (SFT) policy's own first rollouts."})
    length_penalty: float = field(default=0.0, metadata={"help": "Subtract length_penalty x |length - start length| / start length from the score (start = the SFT policy's first rollouts' mean length)."})
    # held-out evaluation
    eval_do_sample: bool = field(default=False, metadata={"help": "Sample held-out responses (default: greedy, deterministic)."})

    def __post_init__(self):
        self.reward = parse_reward_spec(self.reward)
        split_reward_models(self)
        check_gold_fields(self)
        super().__post_init__()
        self.check_engine_fields()  # the rollout engine's keys (TRL's GRPO names): engines.EngineFields
        c = self
        if c.max_kl_action not in MAX_KL_ACTIONS:
            raise ConfigError(f"max_kl_action: must be stop or raise_kl_coef, got {c.max_kl_action!r}")
        if c.reward_normalization not in REWARD_NORMALIZATIONS:
            raise ConfigError(f"reward_normalization: must be none or start, got {c.reward_normalization!r}")
        if c.max_kl is not None and not c.max_kl > 0:
            raise ConfigError(f"max_kl: must be positive, got {c.max_kl}")
        if c.length_penalty < 0:
            raise ConfigError(f"length_penalty: a penalty is subtracted, give a non-negative number, got {c.length_penalty}")
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
        if c.max_kl is not None and c.max_kl_action == "raise_kl_coef" and c.kl_coef == 0:  # 0 x 1.5 stays 0
            raise ConfigError("max_kl_action: raise_kl_coef needs a positive kl_coef (got kl_coef: 0)")
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
