"""A classifier's tokens, scores and files: encoding under the suite's truncation rule, batched scoring,
the label file saved beside the weights, and loading a classify output (or its export) for prediction.

Truncation: a text longer than `max_length` tokens is cut at its end (`truncation_side: right`, the
default) or keeps its end (`left`), through encode.fit_prompt_response (the text as the response, or as
the prompt), counted in the same LengthReport every stage reports.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .classify_data import render_input
from .classify_metrics import sigmoid, softmax
from .encode import LengthReport, _count, fit_prompt_response

LABELS_FILE = "labels.json"  # taxonomy, task and decision threshold, beside the weights (and in an export)


def encode_text(text: str, tokenizer, max_length: int | None, truncation_side: str = "right",
                report: LengthReport | None = None) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if report is not None:
        report.rows += 1
        report.max_tokens_seen = max(report.max_tokens_seen, len(ids))
    if max_length is None or len(ids) <= max_length:
        return ids
    if truncation_side == "left":  # keep the end: the text is the "prompt" whose start is trimmed
        kept, _, what = fit_prompt_response(ids, [], max_length)
    else:  # cut the end: the text is the "response" with no prompt
        _, kept, what = fit_prompt_response([], ids, max_length)
    if report is not None:
        _count(report, what)
    return kept


def encode_classification(dataset, tokenizer, *, max_length: int | None, truncation_side: str = "right",
                          multi_label: bool = False, num_labels: int = 2, source: str = "train"):
    """Rows {text | messages, labels: [ids]} -> input_ids + labels (an id, or a multi-hot float vector)."""
    from datasets import Dataset

    report = LengthReport()
    out = {"input_ids": [], "labels": []}
    for row in dataset:
        out["input_ids"].append(encode_text(render_input(row, tokenizer), tokenizer, max_length, truncation_side, report))
        if multi_label:
            hot = [0.0] * num_labels
            for i in row["labels"]:
                hot[i] = 1.0
            out["labels"].append(hot)
        else:
            out["labels"].append(int(row["labels"][0]))
    return Dataset.from_dict(out), report


def score_texts(model, tokenizer, texts: list[str], *, max_length: int | None, truncation_side: str = "right",
                batch_size: int = 16, report: LengthReport | None = None) -> np.ndarray:
    """Logits for each text, in batches padded on the tokenizer's side (the model pools the last non-pad token)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids = [encode_text(t, tokenizer, max_length, truncation_side, report) for t in texts[start:start + batch_size]]
            batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            out.append(logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    return sigmoid(logits) if multi_label else softmax(logits)


def label_info(labels: list[str], multi_label: bool, threshold: float | None, *, max_length: int | None,
               truncation_side: str) -> dict:
    return {"labels": labels, "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)},
            "problem_type": "multi_label_classification" if multi_label else "single_label_classification",
            "multi_label": multi_label, "threshold": threshold, "max_length": max_length,
            "truncation_side": truncation_side,
            "note": ("multi-label: a label is predicted when sigmoid(logit) >= threshold (tuned on the validation "
                     "split); transformers' pipeline does not apply it: pass top_k=None and compare the scores"
                     if multi_label else "single-label: the predicted label is the argmax of the logits")}


def read_label_info(path) -> dict | None:
    f = Path(path) / LABELS_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def apply_label_config(model, info: dict) -> None:
    """id2label/label2id/problem_type on the config, so a saved model names its labels without this suite."""
    cfg = model.config
    cfg.id2label = {int(k): v for k, v in info["id2label"].items()}
    cfg.label2id = dict(info["label2id"])
    cfg.num_labels = len(info["labels"])
    cfg.problem_type = info["problem_type"]


def load_classifier(path):
    """(model, tokenizer, label info) of a classify output or its export, ready to score."""
    from stages.core.errors import ModelError

    info = read_label_info(path)
    if info is None:
        raise ModelError(f"{path}: no {LABELS_FILE}; expected a classify stage output or its export")
    from stages.export import load_for_inference, load_tokenizer

    model, _ = load_for_inference(str(path), task="seq_cls")
    tokenizer = load_tokenizer(str(path))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    apply_label_config(base, info)
    return model, tokenizer, info
