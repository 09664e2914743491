"""Training curves as a PNG next to each stage's metrics, so a person can look instead of reading logs."""
from __future__ import annotations

from pathlib import Path

_SKIP = {"epoch", "step", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
         "learning_rate", "grad_norm", "num_tokens"}


def plot_curves(log_history: list[dict], path: str | Path, *, title: str = "") -> Path | None:
    """One panel per logged metric (loss, eval loss, rewards, KL, accuracy ...) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        for k, v in entry.items():
            if k in _SKIP or step is None or not isinstance(v, (int, float)) or k.endswith("_runtime") or "per_second" in k:
                continue
            series.setdefault(k, []).append((step, float(v)))
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    keys = sorted(series, key=lambda k: (0 if "loss" in k else 1, k))[:9]
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        xs, ys = zip(*series[k])
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
