"""Classification metrics (scikit-learn), calibration, the multi-label threshold and the confusion-matrix plot.

Single-label: accuracy, macro/micro F1, per-class precision/recall/F1/support, the confusion matrix
(rows = true label, columns = predicted), expected calibration error of the top-label confidence.
Multi-label: subset (exact-match) accuracy, macro/micro F1 over labels, per-label figures and 2x2
confusion [[tn, fp], [fn, tp]], ECE of every label probability; one decision threshold for all labels,
tuned on the validation split (best micro-F1, the midpoint between neighbouring scores).
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 10


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the bin's share."""
    confidence, correct = np.asarray(confidence, float).ravel(), np.asarray(correct, float).ravel()
    if not len(confidence):
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def multi_hot(label_lists, n: int) -> np.ndarray:
    out = np.zeros((len(label_lists), n), dtype=int)
    for i, ids in enumerate(label_lists):
        out[i, list(ids)] = 1
    return out


def tune_threshold(probs: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The global threshold with the best micro-F1 on (probs, truth): (threshold, micro_f1).

    Candidates are 0.5 and the midpoints between neighbouring distinct probabilities, so the chosen value
    separates the scores it was tuned on with the widest margin available; ties keep the one nearest 0.5."""
    from sklearn.metrics import f1_score

    p = np.unique(np.asarray(probs, float).ravel())
    candidates = np.concatenate([[0.5], (p[1:] + p[:-1]) / 2]) if len(p) > 1 else np.array([0.5])
    best, best_f1 = 0.5, -1.0
    for t in sorted(candidates, key=lambda t: abs(t - 0.5)):
        f1 = f1_score(truth.ravel(), (probs.ravel() >= t).astype(int), zero_division=0)
        if f1 > best_f1 + 1e-12:
            best, best_f1 = float(t), float(f1)
    return best, best_f1


def classification_metrics(scores: np.ndarray, label_ids, labels: list[str], *, multi_label: bool,
                           threshold: float | None = None) -> dict:
    """Every figure for one split. `scores` are probabilities (softmax rows, or per-label sigmoids);
    `label_ids` the true ids (single-label: ints; multi-label: lists). Multi-label without a threshold
    tunes one on these rows."""
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, multilabel_confusion_matrix,
                                 precision_recall_fscore_support)

    n = len(labels)
    scores = np.asarray(scores, float)
    ids = list(range(n))
    out: dict = {}
    if multi_label:
        truth = multi_hot(label_ids, n)
        if threshold is None:
            threshold, _ = tune_threshold(scores, truth)
        pred = (scores >= threshold).astype(int)
        out["threshold"] = float(threshold)
        out["accuracy"] = float(accuracy_score(truth, pred))  # exact match of the whole label set
        out["ece"] = expected_calibration_error(scores, truth)
        cm = multilabel_confusion_matrix(truth, pred, labels=ids)
        out["confusion_matrix"] = {labels[i]: cm[i].tolist() for i in ids}  # [[tn, fp], [fn, tp]]
    else:
        truth = np.asarray([x[0] if isinstance(x, (list, tuple, np.ndarray)) else x for x in label_ids], int)
        pred = scores.argmax(-1)
        out["accuracy"] = float(accuracy_score(truth, pred))
        out["ece"] = expected_calibration_error(scores.max(-1), pred == truth)
        out["confusion_matrix"] = confusion_matrix(truth, pred, labels=ids).tolist()
    out["macro_f1"] = float(f1_score(truth, pred, average="macro", labels=ids, zero_division=0))
    out["micro_f1"] = float(f1_score(truth, pred, average="micro", labels=ids, zero_division=0))
    p, r, f, s = precision_recall_fscore_support(truth, pred, labels=ids, zero_division=0)
    out["per_class"] = {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                    "support": int(s[i])} for i in ids}
    return out


def scalars(metrics: dict, prefix: str = "") -> dict:
    """The single-number figures (for the Trainer's logs and early stopping)."""
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def plot_confusion(metrics: dict, labels: list[str], path, title: str) -> None:
    """The confusion matrix as a PNG (multi-label: one 2x2 panel per label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = metrics["confusion_matrix"]
    if isinstance(cm, dict):
        cols = min(len(labels), 4)
        rows = (len(labels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for ax, name in zip(axes.ravel(), labels):
            _matrix(ax, np.array(cm[name]), ["no", "yes"], name)
        for ax in axes.ravel()[len(labels):]:
            ax.axis("off")
    else:
        size = max(4, 0.7 * len(labels) + 2)
        fig, ax = plt.subplots(figsize=(size, size))
        _matrix(ax, np.array(cm), labels, None)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _matrix(ax, cm, names, title):
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
