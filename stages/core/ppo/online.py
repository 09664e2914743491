"""GRPO and RLOO through TRL's trainers, fed by the suite's reward plumbing (one flow for both).

Rewards: `reward_model: PATH` (checked head, our truncation rule) and/or `reward: SPEC` rules, each passed to
TRL as a separate reward function so TRL logs them one by one; their weights become `reward_weights`
(unless the recipe sets reward_weights itself). Held-out prompts are not handed to TRL's own evaluation
(it samples several completions per prompt); instead the stage measures the greedy responses' mean reward
before and after training, like the PPO stage. Reference: TRL's (GRPO's default beta=0 needs none; with
beta > 0 and a fresh adapter it is the adapter-disabled model, i.e. the SFT policy).
"""
from __future__ import annotations

from dataclasses import dataclass

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from .. import stage as S
from .config import RewardFields, parse_reward_spec


@dataclass
class GRPOStageConfig(GRPOConfig, RewardFields):
    """TRL's GRPOConfig plus the suite's reward keys (module-level: TRL pickles its args into checkpoints)."""

    def __post_init__(self):
        self.reward = parse_reward_spec(self.reward)
        super().__post_init__()


@dataclass
class RLOOStageConfig(RLOOConfig, RewardFields):
    """TRL's RLOOConfig plus the suite's reward keys."""

    def __post_init__(self):
        self.reward = parse_reward_spec(self.reward)
        super().__post_init__()


@dataclass(frozen=True)
class Method:
    stage: str
    config: type
    trainer: type


METHODS = {"grpo": Method("grpo", GRPOStageConfig, GRPOTrainer), "rloo": Method("rloo", RLOOStageConfig, RLOOTrainer)}


def run(method_name: str, argv=None):
    import json

    from .. import artifacts
    from transformers import TrainerCallback

    from ..artifacts import StageOutput
    from ..errors import ConfigError
    from ..policy import build_policy, trainable_summary
    from . import rewards as RW
    from .evaluate import greedy_reward

    method = METHODS[method_name]
    name = method.stage
    args = S.parse_stage(method.config, argv)
    cfg = args.training
    out = StageOutput(cfg.output_dir, name)
    RW._required(cfg)
    if "eval_strategy" not in args.explicit:  # our greedy held-out reward replaces TRL's sampled evaluation
        cfg.eval_strategy = "no"

    data = S.load_stage_data(args, task="prompt")
    S.log(name, data.report.summary())
    rm_parent = artifacts.parent_info(cfg.reward_model) if cfg.reward_model else None
    fp = artifacts.fingerprint({"stage": S.stage_fingerprint(args, data.report.to_dict()),
                                "reward_model": (rm_parent or {}).get("fingerprint")})
    if S.check_existing(out, fp, args.run.force, name):
        return out.output_dir

    S.prepare_training(args, out, name)
    policy = build_policy(args.model, args.policy, cfg)
    from accelerate import PartialState

    funcs, weights, _ = RW.trl_reward_funcs(cfg, device=PartialState().device)
    if cfg.reward_weights is None:
        cfg.reward_weights = weights
    elif len(cfg.reward_weights) != len(funcs):
        raise ConfigError(f"reward_weights: {len(cfg.reward_weights)} weights for {len(funcs)} reward functions "
                          f"({', '.join(f.__name__ for f in funcs)})")
    train = data.train.select_columns(["prompt"])
    evals = data.eval.select_columns(["prompt"]) if data.eval is not None and len(data.eval) else None
    trainer = method.trainer(
        model=policy.model, reward_funcs=funcs, args=cfg, train_dataset=train,
        eval_dataset=evals if str(getattr(cfg.eval_strategy, "value", cfg.eval_strategy)) != "no" else None,
        processing_class=policy.tokenizer, peft_config=policy.peft_config, callbacks=S.callbacks(args))
    summary = trainable_summary(trainer.model)
    S.log(name, f"{policy.method}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} parameters; "
                f"rewards: {', '.join(f'{f.__name__} x {w:g}' for f, w in zip(funcs, cfg.reward_weights))}")

    combined = RW.combine(cfg, _models_of(funcs))
    prompts = [r["prompt"] for r in evals] if evals is not None else []

    def held_out():
        from trl.models.utils import unwrap_model_for_generation  # gathers ZeRO-3 parameters for generation

        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            return greedy_reward(model, policy.tokenizer, prompts, combined, max_new_tokens=cfg.max_completion_length,
                                 max_prompt_length=10**6, batch_size=cfg.per_device_eval_batch_size,
                                 device=trainer.accelerator.device, autocast=trainer.accelerator.autocast)

    # the starting policy's figure is taken once training has wrapped the model (an evaluation before
    # train() would break DDP/DeepSpeed: see distributed.py), and cached across resumes
    cache = out.work / "start_metrics.json"
    start = json.loads(cache.read_text()) if cache.is_file() else {}

    class StartReward(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kwargs):
            if not start and prompts:
                start.update(held_out())
                if trainer.is_world_process_zero():
                    artifacts.write_json(cache, start)

    trainer.add_callback(StartReward())
    resume = out.last_checkpoint()
    if resume:
        S.log(name, f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    final = held_out()
    if start and final:
        S.log(name, f"held-out mean reward (greedy): start {start['mean_reward']:.4f} -> final {final['mean_reward']:.4f}")
    metrics = {"start": start, "final": final,
               "reward_gain": (final["mean_reward"] - start["mean_reward"]) if start and final else None}
    manifest = S.base_manifest(args, policy, data, fp, summary) | {
        "metrics": metrics, "task": name, "method": name,
        "reward": {"reward_model": cfg.reward_model, "reward_model_parent": rm_parent, "rules": cfg.reward,
                   "reward_weights": list(cfg.reward_weights)}}
    return S.save_artifact(trainer, policy, out, manifest, name, args.run.keep_checkpoints)


def _models_of(funcs):
    """The reward model already loaded for TRL (reused for the held-out figure, not loaded twice)."""
    for f in funcs:
        if f.__name__ == "reward_model":
            return f.reward
    return None
