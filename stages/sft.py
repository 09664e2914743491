"""Supervised fine-tuning stage.

    accelerate launch stages/sft.py --config recipes/smollm2-135m/sft.yaml
    python -m stages.sft --config recipes/smollm2-135m/sft.yaml --learning_rate 1e-4
    rlhf sft --config recipes/smollm2-135m/sft.yaml

Loss is on assistant responses only by default (`loss_on`), so the reported validation loss is the
response-token loss, compared with the starting model's on the same split.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch stages/sft.py` runs this file as a script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]  # stage names must not shadow packages
    sys.path.insert(0, str(_here.parent))

from stages.core import stage as S  # noqa: E402

STAGE = "sft"
VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")  # these prepend tokens per row, so rows cannot be concatenated


def padding_free_default(args, method: str) -> bool:
    """Padding-free batches on GPUs, padded batches on CPU, unless the recipe says otherwise.

    Padding-free concatenates a batch's rows into one sequence with restarting position_ids; attention
    stays within each row (tests/test_sft_stage.py checks the loss equals the padded batch's). GPU
    flash-attention kernels skip the cross-row blocks, so the padding (40% of a padded SmolLM2 demo
    batch) is pure saving there. CPU attention kernels compute the whole masked square instead, which
    made a padding-free SmolLM2 step 1.4x slower than a padded one (measured): CPU stays padded.
    Methods that prepend virtual tokens to each row (prefix, prompt) cannot be concatenated.
    """
    from stages.core import runtime

    t = args.training
    if "padding_free" in args.explicit or t.packing:
        return bool(t.padding_free)
    return method not in VIRTUAL_TOKEN_METHODS and not runtime.on_cpu(t)


def main(argv=None):
    from stages.core.lifecycle import run_stage

    return run_stage(STAGE, argv, train)


def train(run):
    from trl import SFTTrainer

    from stages.core import fastpath
    from stages.core.encode import encode_sft
    from stages.core.policy import build_policy, trainable_summary
    from stages.core.sampling import seed_length_grouping

    args, data = run.args, run.data
    policy = build_policy(args.model, args.policy, args.training)
    args.training.padding_free = padding_free_default(args, policy.method)  # derived: not in the fingerprint
    t = args.training
    if args.run.group_by_length and not (t.padding_free or t.packing) and "train_sampling_strategy" not in args.explicit:
        t.train_sampling_strategy = "group_by_length"  # padded batches of similar lengths: ~40% less padding

    max_len, d = args.training.max_length, args.data
    train_ds, train_len = S.encode_split(encode_sft, data, "train", policy.tokenizer, args, STAGE, max_length=max_len,
                                         loss_on=d.loss_on, on_long=d.on_long, source="train")
    S.log(STAGE, train_len.summary("train"))
    S.checkpointing_for_memory(args, policy.model, STAGE, longest=train_len.max_tokens_seen, split_exact=True)
    eval_ds = eval_len = None
    if data.eval is not None and len(data.eval):
        eval_ds, eval_len = S.encode_split(encode_sft, data, "eval", policy.tokenizer, args, STAGE, max_length=max_len,
                                           loss_on=d.loss_on, on_long=d.on_long, source="validation")
        S.log(STAGE, eval_len.summary("validation"))

    run.prepare()
    t = args.training
    if t.padding_free and not t.packing:
        t.max_length = None  # rows are already fitted to max_length above; TRL wants None here
    with fastpath.during_init(SFTTrainer, bf16=t.bf16, **S.fast_path_flags(args)):
        trainer = SFTTrainer(model=policy.model, args=t, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=policy.tokenizer, peft_config=policy.peft_config,
                             callbacks=run.callbacks())
    t.max_length = max_len
    seed_length_grouping(trainer)  # the grouped order depends on the seed only, so a resume continues it
    S.log_fast_paths(trainer, STAGE, args)
    S.log(STAGE, "batches: " + ("packed" if t.packing else "padding-free (sequences concatenated, no pad tokens)"
                                if t.padding_free else "padded"))
    summary = trainable_summary(trainer.model)
    S.log(STAGE, f"{policy.method}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} "
                 f"parameters ({summary['trainable_pct']:.2f}%)")

    base = run.evaluate_before(trainer, "base", disable_adapter=True) if args.run.compare_with_base else None
    run.train(trainer)
    final = trainer.evaluate() if eval_ds is not None else {}

    metrics = {"base": base, "final": final, "best_eval_loss": S.best_eval(trainer.state.log_history),
               "lengths": {"train": train_len.to_dict(), "validation": eval_len.to_dict() if eval_len else None}}
    if base and final:
        S.log(STAGE, f"validation loss (response tokens): base {base['base_loss']:.4f} -> final {final['eval_loss']:.4f}")
    return run.save_trainer(trainer, policy, run.manifest(policy, summary, metrics=metrics))


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
