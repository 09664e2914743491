"""PPO stage: InstructGPT-style RLHF with a reward model and/or rule rewards (our own trainer).

    accelerate launch stages/ppo.py --config recipes/smollm2-135m/ppo.yaml
    python -m stages.ppo --config recipes/smollm2-135m/ppo.yaml
    rlhf ppo --config recipes/smollm2-135m/ppo.yaml

The policy starts from an SFT output (a LoRA SFT output is merged on load, so adapters-disabled ==
the SFT policy == the reference). With a PEFT method one frozen base carries the policy, value and
(when the reward model is a LoRA on the same base) reward adapters; with peft_method: full the four
roles are separate models. The manifest records held-out mean reward before and after training and
the final policy's KL to the reference.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch stages/ppo.py` runs this file as a script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from stages.core import stage as S  # noqa: E402

STAGE = "ppo"


def main(argv=None, callbacks=None):
    from stages.core.lifecycle import run_stage

    return run_stage(STAGE, argv, train, callbacks=callbacks)


def train(run, callbacks=None):
    from transformers import set_seed

    from stages.core import artifacts
    from stages.core.errors import ConfigError
    from stages.core.policy import build_policy, trainable_summary
    from stages.core.ppo import rewards as RW
    from stages.core.ppo.artifact import save_policy
    from stages.core.ppo.engines import build as build_engine
    from stages.core.ppo.roles import build_roles
    from stages.core.ppo.trainer import PPOTrainer, make_accelerator

    args, data = run.args, run.data
    cfg = args.training
    if args.run.early_stopping_patience:
        raise ConfigError("early_stopping_patience: not supported by PPO (it has no validation loss); use gold_judge, "
                          "gold_eval_steps and gold_patience to stop on a falling held-out gold score")
    RW._required(cfg)
    rm_parent = artifacts.parent_info(cfg.reward_model) if cfg.reward_model else None

    run.prepare()
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is not None and ds.zero_stage == 3 and args.policy.resolve_method(args.model) == "full":
        raise ConfigError("peft_method: full PPO under DeepSpeed ZeRO-3 is not supported yet (the frozen reference and "
                          "reward copies are not partitioned); use ZeRO-2, DDP, or a PEFT method (one base, four roles)")
    policy = build_policy(args.model, args.policy, cfg)
    roles = build_roles(policy, cfg, device=accelerator.device, load_reward=lambda path: RW.load_separate_reward_model(
        path, device=accelerator.device, batch_size=cfg.reward_batch_size))
    reward = RW.combine(cfg, roles.reward_model, device=accelerator.device)
    gold = RW.build_gold_judge(cfg)
    eval_prompts = [r["prompt"] for r in data.eval] if data.eval is not None else []
    if not eval_prompts:
        S.log(STAGE, "warning: no held-out prompts (eval_datasets or validation_fraction): no before/after reward")
    summary = trainable_summary(roles.actor_critic)  # before accelerate.prepare (ZeRO-3 partitions the weights)
    engine = build_engine(cfg, roles, policy, work_dir=run.out.work, log=lambda m: S.log(STAGE, m))
    trainer = PPOTrainer(cfg, roles, policy.tokenizer, reward, [r["prompt"] for r in data.train], eval_prompts,
                         accelerator=accelerator, checkpoints=run.out.checkpoints, logs=run.out.logs,
                         fingerprint=run.fingerprint, callbacks=[*(callbacks or []), run.progress()],
                         log=lambda m: S.log(STAGE, m), gold=gold, engine=engine)
    if cfg.gold_eval_steps and gold is None:
        S.log(STAGE, "warning: gold_eval_steps without gold_judge: held-out reward, KL and length are logged, "
                     "but the output is the last policy (give gold_judge to keep the best by a judge that is not the reward)")
    S.log(STAGE, f"{roles.mode} mode ({policy.method}): {summary['trainable_params']:,} trainable of "
                 f"{summary['total_params']:,} parameters; " + "; ".join(f"{k}: {v}" for k, v in roles.info.items()))
    S.log(STAGE, f"{trainer.total_updates} updates x {trainer.global_batch} prompts; "
                 f"{trainer.prompt_lengths.trimmed} of {trainer.prompt_lengths.rows} training prompts trimmed to "
                 f"max_prompt_length {cfg.max_prompt_length}")

    try:
        start = run.cached("start", lambda: trainer.evaluate(role="reference"))  # the starting policy (= reference)
        if start:
            S.log(STAGE, f"held-out mean reward before training: {start['mean_reward']:.4f}"
                         + (f"; gold score {start['gold_score']:.4f}" if "gold_score" in start else ""))
        trainer.start_eval = start
        trainer.train(resume_from=run.resume_from)
        final = trainer.evaluate(role="policy")
    finally:
        engine.close()  # a server the stage started is stopped
    if start and final:
        S.log(STAGE, f"held-out mean reward: start {start['mean_reward']:.4f} -> final {final['mean_reward']:.4f}; "
                     f"KL to the reference {final['kl_to_reference']:.4f} nats per response")

    metrics = {"start": start, "final": final, "updates": trainer.update,
               "reward_gain": (final["mean_reward"] - start["mean_reward"]) if start and final else None,
               "kl_to_reference": final.get("kl_to_reference") if final else None,
               "prompt_lengths": trainer.prompt_lengths.to_dict(), "peak_memory_mb": _peak_memory_mb(),
               "guards": _guards(cfg, trainer)}
    manifest = run.manifest(policy, summary, metrics=metrics, task="ppo", memory_mode=roles.mode, roles=roles.info,
                            rollout_engine=engine.name,
                            value_init=roles.value_init,
                            reward={"reward_model": cfg.reward_model, "reward_model_parent": rm_parent,
                                    "rules": cfg.reward, "reward_model_weight": cfg.reward_model_weight})
    accelerator.wait_for_everyone()
    save_policy(trainer, policy, run.out.staging)
    accelerator.wait_for_everyone()
    return run.save(policy, manifest, trainer.history) if accelerator.is_main_process else None


def _guards(cfg, trainer) -> dict:
    """What guarded this run and what they did: the gold selection, early stop, KL limit, reward shaping."""
    out = {"gold_judge": cfg.gold_judge, "gold_eval_steps": cfg.gold_eval_steps, "gold_patience": cfg.gold_patience,
           "gold_select_best": cfg.gold_select_best, "selected_update": trainer.selected_step,
           "last_update": trainer.update, "stopped_early": trainer.stopped, "max_kl": cfg.max_kl,
           "max_kl_action": cfg.max_kl_action, "final_kl_coef": trainer.kl.value,
           "reward_normalization": cfg.reward_normalization, "length_penalty": cfg.length_penalty,
           "start_statistics": trainer.start_stats,
           "reward_models": ([cfg.reward_model] + list(cfg.extra_reward_models)) if cfg.reward_model else [],
           "reward_ensemble": cfg.reward_ensemble if getattr(cfg, "extra_reward_models", None) else None}
    if trainer.tracking_gold:
        out["gold"] = trainer.tracker.summary()
    return out


def _peak_memory_mb() -> dict:
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"peak_rss": round(rss, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_allocated"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
