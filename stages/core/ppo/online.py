"""GRPO, RLOO and online DPO through TRL's trainers, fed by the suite's reward plumbing (one flow for all three).

Rewards: `reward_model: PATH` (checked head, our truncation rule) and/or `reward: SPEC` rules, each passed to
TRL as a separate reward function so TRL logs them one by one; their weights become `reward_weights`
(unless the recipe sets reward_weights itself). Held-out prompts are not handed to TRL's own evaluation
(it samples several completions per prompt); instead the stage measures the greedy responses' mean reward
before and after training, like the PPO stage. Reference: TRL's (GRPO's default beta=0 needs none; with
beta > 0 and a fresh adapter it is the adapter-disabled model, i.e. the SFT policy).
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainerCallback
from trl import GRPOConfig, RLOOConfig

from .. import stage as S
from .config import RewardFields, check_gold_fields, parse_reward_spec, split_reward_models


@dataclass
class GRPOStageConfig(GRPOConfig, RewardFields):
    """TRL's GRPOConfig plus the suite's reward keys (module-level: TRL pickles its args into checkpoints)."""

    def __post_init__(self):
        self.reward = parse_reward_spec(self.reward)
        split_reward_models(self)
        check_gold_fields(self)
        super().__post_init__()


@dataclass
class RLOOStageConfig(RLOOConfig, RewardFields):
    """TRL's RLOOConfig plus the suite's reward keys."""

    def __post_init__(self):
        self.reward = parse_reward_spec(self.reward)
        split_reward_models(self)
        check_gold_fields(self)
        super().__post_init__()


def run(method_name: str, argv=None):
    from ..lifecycle import run_stage

    return run_stage(method_name, argv, train)


def train(run):
    from transformers import TrainerCallback

    from .. import artifacts
    from ..errors import ConfigError
    from ..policy import build_policy, trainable_summary
    from . import rewards as RW
    from .evaluate import greedy_reward

    name, args, data = run.stage, run.args, run.data
    cfg = args.training
    RW._required(cfg)
    _check_trl_vllm(cfg)
    if "eval_strategy" not in args.explicit:  # our greedy held-out reward replaces TRL's sampled evaluation
        cfg.eval_strategy = "no"
    rm_parent = artifacts.parent_info(cfg.reward_model) if cfg.reward_model else None

    run.prepare()
    policy = build_policy(args.model, args.policy, cfg)
    if name != "online_dpo" and policy.peft_config is None and cfg.beta > 0 and policy.merged_adapter:
        # (OnlineDPOTrainer copies the model as loaded into its reference: nothing to point)
        point_reference_at_loaded_model(policy, run.out.work / "reference")
    from accelerate import PartialState

    funcs, weights, _ = RW.trl_reward_funcs(cfg, device=PartialState().device)
    if cfg.reward_weights is None:
        cfg.reward_weights = weights
    elif len(cfg.reward_weights) != len(funcs):
        raise ConfigError(f"reward_weights: {len(cfg.reward_weights)} weights for {len(funcs)} reward functions "
                          f"({', '.join(f.__name__ for f in funcs)})")
    train_rows = data.train.select_columns(["prompt"])
    evals = data.eval.select_columns(["prompt"]) if data.eval is not None and len(data.eval) else None
    trainer = run.spec.trainer_class()(
        model=policy.model, reward_funcs=funcs, args=cfg, train_dataset=train_rows,
        eval_dataset=evals if str(getattr(cfg.eval_strategy, "value", cfg.eval_strategy)) != "no" else None,
        processing_class=policy.tokenizer, peft_config=policy.peft_config, callbacks=run.callbacks())
    summary = trainable_summary(trainer.model)
    S.log(name, f"{policy.method}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} parameters; "
                f"rewards: {', '.join(f'{f.__name__} x {w:g}' for f, w in zip(funcs, cfg.reward_weights))}")

    combined = _weighted(funcs, cfg.reward_weights)  # the held-out figure weighs rewards as training does
    prompts = [r["prompt"] for r in evals] if evals is not None else []
    gold = RW.build_gold_judge(cfg)
    max_new_tokens = getattr(cfg, "max_completion_length", None) or cfg.max_new_tokens  # online DPO: max_new_tokens

    def held_out():
        from trl.models.utils import unwrap_model_for_generation  # gathers ZeRO-3 parameters for generation

        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            return greedy_reward(model, policy.tokenizer, prompts, combined, max_new_tokens=max_new_tokens,
                                 max_prompt_length=10**6, batch_size=cfg.per_device_eval_batch_size,
                                 device=trainer.accelerator.device, autocast=trainer.accelerator.autocast, gold=gold)

    # the starting policy's figure is taken once training has wrapped the model (an evaluation before
    # train() would break DDP/DeepSpeed: see distributed.py), and cached across resumes
    start: dict = {}

    class StartReward(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kwargs):
            if prompts:
                start.update(run.cached("start", held_out) or {})

    trainer.add_callback(StartReward())
    guard = GoldCallback(cfg, trainer, held_out, start, log=lambda m: S.log(name, m)) if (
        cfg.gold_eval_steps and prompts) else None
    if guard is not None:
        if gold is None:
            S.log(name, "warning: gold_eval_steps without gold_judge: held-out reward, KL and length are logged, but "
                        "the output is the last policy")
        trainer.add_callback(guard)
    run.train(trainer)
    if guard is not None:
        guard.restore_best()
    final = held_out()
    if start and final:
        S.log(name, f"held-out mean reward (greedy): start {start['mean_reward']:.4f} -> final {final['mean_reward']:.4f}")
    metrics = {"start": start, "final": final,
               "reward_gain": (final["mean_reward"] - start["mean_reward"]) if start and final else None,
               "guards": guard.summary() if guard is not None else None}
    manifest = run.manifest(policy, summary, metrics=metrics, task=name, method=name, reward={
        "reward_model": cfg.reward_model, "reward_model_parent": rm_parent, "rules": cfg.reward,
        "reward_weights": list(cfg.reward_weights)})
    return run.save_trainer(trainer, policy, manifest)


class GoldCallback(TrainerCallback):
    """Every `gold_eval_steps` optimizer steps: greedy held-out responses scored by the training reward and the
    gold judge, with KL and length, appended to the log history under the agreed names; the best by the gold
    score (the start included) is kept in memory and becomes the output; training stops on a falling gold
    score with a rising reward (`gold_patience`). The kept weights live in memory: a resumed run keeps
    following the gold score but chooses among the evaluations after the resume."""

    def __init__(self, cfg, trainer, held_out, start: dict, log=print):
        from .guards import GoldTracker

        self.cfg, self.trainer, self.held_out, self.start, self.log = cfg, trainer, held_out, start, log
        self.tracker = GoldTracker(patience=cfg.gold_patience)
        self.best_weights, self.last_step = None, 0

    def _trainable(self):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def _record(self, step: int, held: dict, state) -> None:
        from .guards import eval_entry

        entry = eval_entry(step, held)
        if step == 0:
            entry.setdefault("kl_to_reference", 0.0)
        state.log_history.append(entry)
        self.last_step = step
        self.log(f"held-out at step {step}: reward {entry.get('heldout_reward', float('nan')):.4f}"
                 + (f", gold {entry['gold_score']:.4f}" if "gold_score" in entry else "")
                 + (f", KL {entry['kl_to_reference']:.3f}" if "kl_to_reference" in entry else "")
                 + f", length {entry.get('response_length', 0.0):.1f}")
        if "gold_score" in entry and self.tracker.observe(entry) and self.cfg.gold_select_best:
            self.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in self._trainable().items()}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and self.tracker.best is None:
            self._record(0, self.start or self.held_out(), state)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.cfg.gold_eval_steps == 0 or step >= state.max_steps:
            self._record(step, self.held_out(), state)
            if self.tracker.should_stop:
                self.log(f"stopping early at step {step}: {self.tracker.stopped}")
                control.should_training_stop = True

    def restore_best(self) -> None:
        best = self.tracker.best
        if not (self.cfg.gold_select_best and best is not None and self.best_weights is not None):
            return
        if best["step"] != self.last_step:
            import torch

            params = self._trainable()
            with torch.no_grad():
                for n, w in self.best_weights.items():
                    params[n].copy_(w.to(params[n].device, params[n].dtype))
            self.log(f"output = the policy of step {best['step']} (best gold score {best['gold_score']:.4f}; "
                     f"last evaluated step {self.last_step})")
        self.selected_step = best["step"]

    def summary(self) -> dict:
        return {"gold_judge": self.cfg.gold_judge, "gold_eval_steps": self.cfg.gold_eval_steps,
                "gold_patience": self.cfg.gold_patience, "gold_select_best": self.cfg.gold_select_best,
                "selected_step": getattr(self, "selected_step", None), "stopped_early": self.tracker.stopped,
                "gold": self.tracker.summary()}


def point_reference_at_loaded_model(policy, directory):
    """GRPO/RLOO take no ref_model: with beta > 0 and full fine-tuning they rebuild the reference from
    config._name_or_path, which after a merged SFT adapter still names the raw base. Save the merged
    policy once in the work dir and point the name there, so the reference is the SFT policy."""
    from pathlib import Path

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        policy.model.save_pretrained(str(directory), safe_serialization=True)
        policy.tokenizer.save_pretrained(str(directory))
    policy.model.config._name_or_path = str(directory)
    S.log("reference", f"reference = the merged starting policy, saved in {directory}")


def _weighted(funcs, weights):
    """One .score() object over TRL reward functions with the weights TRL trains with (reward_weights)."""
    from reward.rules import CombinedReward

    parts = [(f.reward, float(w)) for f, w in zip(funcs, weights)]
    return parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else CombinedReward(parts)


def _check_trl_vllm(cfg) -> None:
    """use_vllm / vllm_mode (the same keys as PPO's rollout engine) go to TRL unchanged; TRL's vLLM path needs
    vLLM importable here in both modes (its server client syncs weights over NCCL): say so before any model loads."""
    if not getattr(cfg, "use_vllm", False):
        return
    from trl.import_utils import is_vllm_available

    from ..errors import ConfigError

    if not is_vllm_available():
        raise ConfigError(f"use_vllm: TRL's vLLM generation (vllm_mode {cfg.vllm_mode}) needs vLLM (TRL 1.16 accepts "
                          "0.22-0.31) installed in this environment, and a GPU for its weight sync; it is not "
                          "installed: set use_vllm false")
