"""The preference-optimisation stages (DPO and its loss family, KTO, ORPO, CPO/SimPO) share one flow.

Reference model: starting from an SFT output, a LoRA/DoRA/IA3 SFT adapter is merged on load
(see policy.py), and a fresh adapter is trained on top; TRL then uses "adapters disabled" as the
reference, which is exactly the SFT policy, with no second copy of the model in memory. A full
fine-tuned policy gets TRL's separate frozen reference copy. ORPO and CPO (SimPO) need no reference at all.
"""
from __future__ import annotations

import os

from . import stage as S


PRETOKENIZED = {"dpo"}  # our truncation rule applied before TRL sees the rows (KTO/ORPO/CPO tokenise themselves)
# DPO losses that are a mean of per-pair terms: gradient accumulation over micro-batches gives the same loss
# (the `sft` term is a token mean per batch, `aot` sorts within the batch, `bco_pair` keeps a running mean)
PER_PAIR_DPO_LOSSES = {"sigmoid", "hinge", "ipo", "robust"}
REFERENCE_FREE = {"orpo", "cpo"}  # no reference model at all (CPO's loss_type simpo is SimPO)


def loss_is_a_mean_over_pairs(name: str, training) -> bool:
    """Whether a batch may train as micro-batches without changing the loss (stage.checkpointing_for_memory):
    DPO with per-pair losses only. KTO estimates its KL term per batch; ORPO and CPO add a token-mean NLL."""
    if name != "dpo":
        return False
    losses = training.loss_type if isinstance(training.loss_type, (list, tuple)) else [training.loss_type]
    return {getattr(x, "value", x) for x in losses} <= PER_PAIR_DPO_LOSSES and getattr(training, "rpo_alpha", None) is None


def _conversational_rows(dataset):
    """KTO, ORPO and CPO tokenise themselves: give them TRL's conversational columns only."""
    keep = [c for c in ("prompt", "chosen", "rejected", "completion", "label") if c in dataset.column_names]
    return dataset.select_columns(keep)


def _trainer_class(spec):
    """DPOTrainer re-tokenises whatever it gets (and drops/cuts long rows); ours arrive tokenised and fitted."""
    cls = spec.trainer_class()
    if spec.name not in PRETOKENIZED:
        return cls

    class PreTokenized(cls):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, *args, **kwargs)

    PreTokenized.__name__ = PreTokenized.__qualname__ = cls.__name__
    return PreTokenized


def run(method_name: str, argv=None):
    from .lifecycle import run_stage

    return run_stage(method_name, argv, train)


def train(run):
    from . import fastpath
    from .encode import encode_preference
    from .policy import build_policy, frozen_reference, trainable_summary

    name, spec, args, data = run.stage, run.spec, run.args, run.data
    pretokenize = name in PRETOKENIZED
    policy = build_policy(args.model, args.policy, args.training)
    if name == "dpo" and "precompute_ref_log_probs" not in args.explicit:  # derived: not in the fingerprint
        args.training.precompute_ref_log_probs = precompute_pays_off(args.training, data.eval is not None and len(data.eval) > 0)

    max_len, on_long = args.training.max_length, args.data.on_long
    splits, lengths = {}, {}
    for split, rows in (("train", data.train), ("validation", data.eval)):
        if rows is None or not len(rows):
            continue
        encoded, report = S.encode_split(encode_preference, data, "train" if split == "train" else "eval",
                                         policy.tokenizer, args, name, max_length=max_len, on_long=on_long,
                                         source=split, layout="dpo")
        S.log(name, report.summary(split))
        splits[split] = encoded if pretokenize else _conversational_rows(rows)
        lengths[split] = report.to_dict()
    S.checkpointing_for_memory(args, policy.model, name, rows_per_example=2, longest=lengths["train"]["max_tokens_seen"],
                               split_exact=loss_is_a_mean_over_pairs(name, args.training))
    if not pretokenize:
        S.log(name, f"{name}: TRL tokenises these rows itself and truncates long ones by its own rule; counts above")

    run.prepare()
    trainer_cls = _trainer_class(spec)
    extra = {}
    if name not in REFERENCE_FREE and policy.peft_config is None and not hasattr(policy.model, "peft_config"):
        # full fine-tuning: the reference is a frozen copy of the model as loaded (the merged SFT policy);
        # left to TRL it would be rebuilt from config._name_or_path, i.e. the raw base
        extra["ref_model"] = frozen_reference(policy.model)
    with fastpath.during_init(trainer_cls, bf16=args.training.bf16, **S.fast_path_flags(args)):
        trainer = trainer_cls(
            model=policy.model, args=args.training, train_dataset=splits["train"], eval_dataset=splits.get("validation"),
            processing_class=policy.tokenizer, peft_config=policy.peft_config, callbacks=run.callbacks(), **extra)
    S.log_fast_paths(trainer, name, args, lm_head=name == "dpo")
    summary = trainable_summary(trainer.model)
    S.log(name, f"{policy.method}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} "
                f"parameters ({summary['trainable_pct']:.2f}%); reference: {reference_kind(policy, name)}")

    start = run.evaluate_before(trainer, "start", disable_adapter=False)
    run.train(trainer)
    final = trainer.evaluate() if "validation" in splits else {}
    acc = "eval_rewards/accuracies"
    if start and final and acc in final:
        S.log(name, f"held-out implicit-reward accuracy: start {start.get('start_rewards/accuracies', 0):.3f} -> "
                    f"final {final[acc]:.3f}; margin -> {final.get('eval_rewards/margins', float('nan')):.3f}")
    metrics = {"start": start, "final": final, "lengths": lengths, "reference": reference_kind(policy, name)}
    return run.save_trainer(trainer, policy, run.manifest(policy, summary, metrics=metrics, method=name))


def precompute_pays_off(t, has_validation: bool) -> bool:
    """Default for `precompute_ref_log_probs`: on when the reference would otherwise see a row more than once.

    The stage evaluates the validation split at least twice (start and final) and more with eval_steps,
    and each epoch re-scores every training row; precomputing does each row once, up front. It also lets
    TRL drop a separate full-model reference from memory. Off when the reference moves (sync_ref_model).
    """
    if getattr(t, "sync_ref_model", False):
        return False
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # TRL's precompute cache needs datasets every rank shares
        return False
    return has_validation or (t.max_steps <= 0 and t.num_train_epochs > 1)


def reference_kind(policy, method_name: str) -> str:
    if method_name in REFERENCE_FREE:
        return "none (reference-free)"
    start = f"merged {policy.merged_adapter}" if policy.merged_adapter else policy.source
    if policy.peft_config is not None:
        return f"adapters disabled = {start}"
    if hasattr(policy.model, "peft_config"):
        return f"frozen copy of the starting adapter ('ref' adapter) on {start}"
    return f"separate frozen copy of {start}"
