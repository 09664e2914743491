"""Reward-model stage: a scalar head trained on preference pairs with TRL's RewardTrainer.

    accelerate launch stages/rm.py --config recipes/smollm2-135m/rm.yaml
    python -m stages.rm --config recipes/smollm2-135m/rm.yaml
    rlhf rm --config recipes/smollm2-135m/rm.yaml

Starts from a base model or an SFT output (a LoRA SFT output is merged first). LoRA uses task type
SEQ_CLS, so PEFT keeps the score head trainable and saves it with the adapter. Pairs longer than
max_length are truncated by the suite's rule (never silently dropped, as TRL would).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch stages/rm.py` runs this file as a script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from stages.core import stage as S  # noqa: E402

STAGE = "rm"


def main(argv=None):
    from stages.core.lifecycle import run_stage

    return run_stage(STAGE, argv, train)


def train(run):
    from trl import RewardTrainer

    from stages.core.encode import encode_preference
    from stages.core.policy import build_policy, trainable_summary

    args, data = run.args, run.data
    policy = build_policy(args.model, args.policy, args.training, task="seq_cls", num_labels=1)

    max_len, on_long = args.training.max_length, args.data.on_long
    train_ds, train_len = S.encode_split(encode_preference, data, "train", policy.tokenizer, args, STAGE,
                                         max_length=max_len, on_long=on_long)
    S.log(STAGE, train_len.summary("train"))
    S.pad_lengths_for_reuse(args, STAGE)
    S.checkpointing_for_memory(args, policy.model, STAGE, rows_per_example=2, split_exact=True,
                               longest=S.padded_length(train_len.max_tokens_seen, args.training.pad_to_multiple_of))
    eval_ds = eval_len = None
    if data.eval is not None and len(data.eval):
        eval_ds, eval_len = S.encode_split(encode_preference, data, "eval", policy.tokenizer, args, STAGE,
                                           max_length=max_len, on_long=on_long, source="validation")
        S.log(STAGE, eval_len.summary("validation"))

    run.prepare()
    trainer = RewardTrainer(model=policy.model, args=args.training, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=policy.tokenizer, peft_config=policy.peft_config,
                            callbacks=run.callbacks())
    S.log_fast_paths(trainer, STAGE, args, lm_head=False)
    summary = trainable_summary(trainer.model)
    S.log(STAGE, f"{policy.method}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} "
                 f"parameters ({summary['trainable_pct']:.2f}%)")

    start = run.evaluate_before(trainer, "start", disable_adapter=False)
    run.train(trainer)
    final = trainer.evaluate() if eval_ds is not None else {}
    if start and final:
        S.log(STAGE, f"held-out pair accuracy: start {start['start_accuracy']:.3f} -> final {final['eval_accuracy']:.3f}; "
                     f"margin {start['start_margin']:.3f} -> {final['eval_margin']:.3f}")

    metrics = {"start": start, "final": final,
               "lengths": {"train": train_len.to_dict(), "validation": eval_len.to_dict() if eval_len else None}}
    # max_length is the context the head was trained on: scoring uses it (reward/model.py)
    manifest = run.manifest(policy, summary, metrics=metrics, task="reward_model", max_length=max_len)
    return run.save_trainer(trainer, policy, manifest)


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
