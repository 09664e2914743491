"""Classification stage: a causal LM (a base, the built-in alias or an SFT output) with a sequence-classification
head, fine-tuned on your label taxonomy, single-label (softmax) or multi-label (sigmoid/BCE, threshold tuned).

    accelerate launch stages/classify.py --config recipes/smollm2-135m/classify.yaml
    python -m stages.classify --config recipes/smollm2-135m/classify.yaml
    rlhf classify --config recipes/smollm2-135m/classify.yaml

Trains with transformers' Trainer through the shared policy builder (full, LoRA/DoRA/QLoRA/IA3/prompt
tuning; with PEFT the head is trained and saved with the adapter). Evaluates the untrained head before and
the model after training (accuracy, macro/micro-F1, per-class figures, confusion matrix, ECE), next to the
zero-shot instruct base and a TF-IDF + logistic-regression baseline on the same validation split.
The output holds labels.json (taxonomy, task, threshold) beside the weights; `rlhf predict` and
`rlhf export` read it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch stages/classify.py` runs this file as a script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from transformers import TrainingArguments  # noqa: E402

from stages.core import stage as S  # noqa: E402
from stages.core.errors import ConfigError  # noqa: E402

STAGE = "classify"
UNSUPPORTED = {"prefix": "prefix tuning needs past key values, which sequence-classification models do not pass "
                         "through (PEFT: 'Model does not support past key values'); use lora, dora, qlora, ia3 or prompt"}


@dataclass
class ClassifyConfig(TrainingArguments):
    """TrainingArguments plus the classification keys."""

    learning_rate: float = field(default=1.0e-4, metadata={"help": "AdamW learning rate."})
    max_length: int | None = field(default=256, metadata={"help": "Tokens per text; longer texts are truncated (counted)."})
    labels: list[str] | None = field(default=None, metadata={"help": "The taxonomy in id order (a list, or a file: one name a line, or a JSON/YAML list). Default: sorted names in the data."})
    multi_label: bool = field(default=False, metadata={"help": "Each row has any subset of the labels (sigmoid + BCE, a tuned threshold)."})
    class_weights: str | None = field(default=None, metadata={"help": "balanced: weight the loss by inverse class frequency (multi-label: positive weights)."})
    truncation_side: str = field(default="right", metadata={"help": "right: cut long texts at their end; left: keep their end."})
    threshold: float | None = field(default=None, metadata={"help": "Multi-label decision threshold; default: tuned on the validation split."})
    zero_shot_baseline: bool = field(default=True, metadata={"help": "Score the instruct base zero-shot with the label names on the validation split."})
    tfidf_baseline: bool = field(default=True, metadata={"help": "Train and score TF-IDF + logistic regression on the same split."})

    def __post_init__(self):
        super().__post_init__()
        if self.class_weights not in (None, "none", "balanced"):
            raise ConfigError(f"class_weights: must be balanced (or none), got {self.class_weights!r}")
        if self.class_weights == "none":
            self.class_weights = None
        if self.truncation_side not in ("right", "left"):
            raise ConfigError(f"truncation_side: must be right (cut the end) or left (keep the end), got {self.truncation_side!r}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ConfigError(f"threshold: must be between 0 and 1, got {self.threshold}")
        if self.threshold is not None and not self.multi_label:
            raise ConfigError("threshold: only multi-label classification has a decision threshold (set multi_label: true)")


def refuse_unsupported_method(args) -> str:
    method = args.policy.resolve_method(args.model)
    if method in UNSUPPORTED:
        raise ConfigError(f"peft_method: {method}: {UNSUPPORTED[method]}")
    return method


def load_rows(args):
    """The lifecycle's data loader for this stage (registry `data_loader`): rows, taxonomy, report."""
    from stages.core.classify_data import load_classification, read_taxonomy

    refuse_unsupported_method(args)  # before reading any data
    t, d = args.training, args.data
    train, evals = S.data_sources(args)
    labels = t.labels[0] if isinstance(t.labels, list) and len(t.labels) == 1 and Path(t.labels[0]).is_file() else t.labels
    fraction = d.validation_fraction if d.test_split_size is None else d.test_split_size
    return load_classification(train, eval_sources=evals, taxonomy=read_taxonomy(labels), multi_label=t.multi_label,
                               column_mapping=d.column_mapping, validation_fraction=fraction,
                               validation_size=d.validation_size, seed=t.seed, max_train_rows=d.max_train_rows,
                               max_eval_rows=d.max_eval_rows)


def main(argv=None):
    from stages.core.lifecycle import run_stage

    return run_stage(STAGE, argv, train)


def _loss(weights, multi_label: bool):
    """compute_loss_func for `class_weights: balanced` (None: the model's own loss for its problem_type)."""
    if weights is None:
        return None
    import torch
    import torch.nn.functional as F

    w = torch.tensor(weights, dtype=torch.float32)

    def loss(outputs, labels, num_items_in_batch=None):
        # transformers treats a compute_loss_func's loss as already scaled for gradient accumulation (and
        # multiplies it by the process count): so, like its own losses, sum over the micro-batch and divide by
        # the items of the whole accumulated batch (num_items_in_batch) when it is given
        logits = outputs.logits.float()
        if multi_label:
            per_item = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=w.to(logits.device),
                                                          reduction="none")
        else:
            per_item = F.cross_entropy(logits, labels, weight=w.to(logits.device), reduction="none")
        if num_items_in_batch is None:
            return per_item.mean()
        return per_item.sum() / torch.as_tensor(num_items_in_batch, device=logits.device).clamp(min=1)

    return loss


def _truth(label_ids, multi_label: bool):
    import numpy as np

    if multi_label:
        return [list(np.flatnonzero(row > 0.5)) for row in np.asarray(label_ids)]
    return [int(x) for x in np.asarray(label_ids).ravel()]


def train(run):
    from transformers import DataCollatorWithPadding, Trainer

    from stages.core import classify_metrics as CM
    from stages.core.classify_data import class_weights
    from stages.core.classify_model import LABELS_FILE, apply_label_config, encode_classification, label_info, probabilities
    from stages.core.policy import build_policy, trainable_summary

    args, data, t = run.args, run.data, run.args.training
    report, labels, multi = data.report, data.report.labels, t.multi_label
    method = refuse_unsupported_method(args)
    if data.eval is None or not len(data.eval):
        raise ConfigError("classify: needs a validation split (eval_datasets or validation_fraction > 0): the "
                          "before/after evaluation, the baselines and the multi-label threshold are measured on it")
    run.prepare()  # the work dir is this fingerprint's from here on: the baselines are cached in it
    eval_rows, train_rows = list(data.eval), list(data.train)
    baselines = {}
    if t.tfidf_baseline:
        from stages.core.classify_baselines import tfidf_logistic_regression

        baselines["tfidf_logreg"] = run.cached("tfidf", lambda: tfidf_logistic_regression(
            train_rows, eval_rows, labels, multi_label=multi, class_weight=t.class_weights, seed=t.seed,
            log=lambda m: S.log(STAGE, m)))
    if t.zero_shot_baseline:
        baselines["zero_shot"] = run.cached("zero_shot", lambda: _zero_shot(args, eval_rows, labels, multi))

    policy = build_policy(args.model, args.policy, t, task="seq_cls", num_labels=len(labels))
    info = label_info(labels, multi, t.threshold, max_length=t.max_length, truncation_side=t.truncation_side)
    apply_label_config(policy.model, info)
    model = _with_adapter(policy, t)

    enc = dict(max_length=t.max_length, truncation_side=t.truncation_side, multi_label=multi, num_labels=len(labels))
    train_ds, train_len = S.encode_split(encode_classification, data, "train", policy.tokenizer, args, STAGE, **enc)
    eval_ds, eval_len = S.encode_split(encode_classification, data, "eval", policy.tokenizer, args, STAGE, **enc)
    S.log(STAGE, train_len.summary("train") + f" (truncation_side {t.truncation_side})")
    S.log(STAGE, eval_len.summary("validation"))
    S.checkpointing_for_memory(args, policy.model, STAGE, longest=train_len.max_tokens_seen)

    def full_metrics(logits, label_ids, threshold=None):
        return CM.classification_metrics(probabilities(logits, multi), _truth(label_ids, multi), labels,
                                         multi_label=multi, threshold=threshold if threshold is not None else t.threshold)

    def compute_metrics(pred):
        return CM.scalars(full_metrics(pred.predictions, pred.label_ids))

    weights = class_weights(report, multi, len(train_rows)) if t.class_weights else None
    if weights:
        S.log(STAGE, "class weights (balanced): " + ", ".join(f"{n} {w:.2f}" for n, w in zip(labels, weights)))
    trainer = Trainer(model=model, args=t, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=policy.tokenizer,
                      data_collator=DataCollatorWithPadding(policy.tokenizer), compute_metrics=compute_metrics,
                      compute_loss_func=_loss(weights, multi), callbacks=run.callbacks())
    summary = trainable_summary(trainer.model)
    S.log(STAGE, f"{policy.method}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} "
                 f"parameters ({summary['trainable_pct']:.2f}%)")

    def predict_metrics():
        out = trainer.predict(eval_ds, metric_key_prefix="predict")
        return full_metrics(out.predictions, out.label_ids)

    start = run.cached("start_full", predict_metrics) if args.run.compare_with_base else None
    run.train(trainer)
    final = predict_metrics()
    info["threshold"] = final.get("threshold")
    results = {"untrained_head": start, **baselines, "trained": final}
    for name, m in results.items():
        if m:
            S.log(STAGE, f"held-out {name}: macro-F1 {m['macro_f1']:.3f}, micro-F1 {m['micro_f1']:.3f}, "
                         f"accuracy {m['accuracy']:.3f}, ECE {m['ece']:.3f}")

    staging = run.out.staging
    import json

    (staging / LABELS_FILE).write_text(json.dumps(info, indent=2) + "\n")
    for name, m in (("start", start), ("final", final)):
        if m:
            try:
                CM.plot_confusion(m, labels, staging / f"confusion_{name}.png",
                                  f"{STAGE}: {'untrained head' if name == 'start' else 'trained'} (validation)")
            except Exception as e:  # a plot must never cost the artifact
                S.log(STAGE, f"could not draw confusion_{name}.png: {e}")
    metrics = {"start": CM.scalars(start, "start_") if start else None, "final": CM.scalars(final, "eval_"),
               "classification": results, "best_metric": trainer.state.best_metric,
               "lengths": {"train": train_len.to_dict(), "validation": eval_len.to_dict()}}
    manifest = run.manifest(policy, summary, metrics=metrics, task="classification", labels=labels, multi_label=multi,
                            threshold=info["threshold"], max_length=t.max_length, truncation_side=t.truncation_side,
                            class_weights=weights)
    return run.save_trainer(trainer, policy, manifest)


def _with_adapter(policy, t):
    """transformers' Trainer takes a model, not a peft_config: wrap it here (k-bit models prepared first)."""
    if policy.peft_config is None:
        return policy.model
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = policy.model
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(t.gradient_checkpointing))
    return get_peft_model(model, policy.peft_config)


def _zero_shot(args, eval_rows, labels, multi):
    """The starting model as an instruct causal LM, prompted with the label names (freed before training)."""
    import gc

    from stages.core import models, runtime
    from stages.core.classify_baselines import zero_shot
    from stages.core.policy import _load_dtype, load_model

    t, source = args.training, args.model.model_name_or_path
    S.log(STAGE, f"zero-shot baseline: {source} prompted with the label names on {len(eval_rows)} validation rows")
    tok = models.load_tokenizer(source, chat_template=args.policy.chat_template)
    model, _, _ = load_model(source, task="causal_lm", dtype=_load_dtype(args.model, t, False))
    try:
        import torch

        if not runtime.on_cpu(t):
            model = model.to("cuda")
        return zero_shot(model, tok, eval_rows, labels, multi_label=multi, max_length=t.max_length,
                         log=lambda m: S.log(STAGE, m))
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
