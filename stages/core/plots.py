"""Curated training curves (`curves.png`): the few panels that say whether a stage worked, per stage.

Each stage gets panels chosen for it (CURATED, keyed by stage name): SFT and classification show train
and validation loss on one panel with the base model's validation loss as a line and the best step
marked; a reward model shows pair accuracy and margin against the untrained start; DPO/KTO/ORPO the
implicit-reward accuracy, margin and chosen/rejected log-probs; PPO/GRPO/RLOO reward, KL, response
length and clip fraction, plus the held-out reward next to the gold judge's score and the KL to the
reference when periodic held-out evaluations logged them. A stage without an entry gets the panel set
its logged keys match (preference, RL) or a generic loss + learning-rate figure. Bookkeeping keys
(runtimes, throughput, token counts, the single closing `train_loss`) never get a panel.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Series:
    """One line: the first of `keys` the history holds (TRL and our trainer name the same figure differently)."""

    keys: tuple[str, ...]
    label: str
    style: str = "-"
    color: str | None = None


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]
    before: tuple[str, ...] = ()      # manifest metrics keys ("base.base_loss", "start.start_accuracy"): a dashed line
    before_label: str = "before training"
    mark_best: str | None = None      # a series key whose best (lowest) step is marked
    twin: Series | None = None        # a second y axis (a different scale on the same steps)
    twin_ylabel: str = ""


def line(*keys, label, style="-", color=None):
    return Series(tuple(keys), label, style, color)


def _loss_panel(title="Loss (train and validation)", unit="cross-entropy, nats/token", base_label="base model (validation)"):
    return Panel(title, unit, (line("loss", label="train"), line("eval_loss", label="validation", style="o-")),
                 before=("base.base_loss", "start.start_loss"), before_label=base_label, mark_best="eval_loss")


LEARNING_RATE = Panel("Learning rate", "learning rate", (line("learning_rate", label="learning rate"),))

SUPERVISED = (_loss_panel(), LEARNING_RATE)
CLASSIFY = (_loss_panel(unit="cross-entropy, nats/example"),
            Panel("Validation macro-F1", "macro-F1 (0-1)", (line("eval_macro_f1", label="validation", style="o-"),),
                  before=("base.base_macro_f1", "start.start_macro_f1")),
            LEARNING_RATE)
REWARD_MODEL = (
    Panel("Pair accuracy (chosen scored above rejected)", "fraction of pairs",
          (line("accuracy", label="train"), line("eval_accuracy", label="validation", style="o-")),
          before=("start.start_accuracy",), before_label="untrained start (validation)"),
    Panel("Reward margin (chosen - rejected)", "reward units",
          (line("margin", label="train"), line("eval_margin", label="validation", style="o-")),
          before=("start.start_margin",), before_label="untrained start (validation)"),
    _loss_panel("Loss (pairwise)", "-log sigmoid(margin)", "untrained start (validation)"),
)
PREFERENCE = (
    Panel("Implicit-reward accuracy", "fraction of pairs",
          (line("rewards/accuracies", label="train"), line("eval_rewards/accuracies", label="validation", style="o-")),
          before=("start.start_rewards/accuracies",), before_label="start (validation)"),
    Panel("Implicit-reward margin (chosen - rejected)", "reward units (beta x log-ratio)",
          (line("rewards/margins", label="train"), line("eval_rewards/margins", label="validation", style="o-")),
          before=("start.start_rewards/margins",), before_label="start (validation)"),
    Panel("Log-probabilities of the responses", "log-prob, nats per response",
          (line("logps/chosen", label="chosen (train)", color="tab:green"),
           line("logps/rejected", label="rejected (train)", color="tab:red"),
           line("eval_logps/chosen", label="chosen (validation)", style="o--", color="tab:green"),
           line("eval_logps/rejected", label="rejected (validation)", style="o--", color="tab:red"))),
    _loss_panel("Loss", "preference loss", "start (validation)"),
)
REINFORCEMENT = (
    Panel("Reward (training rollouts)", "reward", (line("objective/reward", "reward", label="reward"),
                                                   line("objective/score", label="score (before KL penalty)", style="--"))),
    Panel("KL to the reference", "KL, nats per response", (line("objective/kl", "kl", label="KL"),)),
    Panel("Response length", "tokens", (line("response/length", "completions/mean_length", label="mean length"),)),
    Panel("Clip fraction", "fraction of tokens clipped",
          (line("policy/clipfrac", "clip_ratio/region_mean", label="policy"), line("value/clipfrac", label="value", style="--"))),
    # periodic held-out evaluations (agreed names), drawn only when logged
    Panel("Held-out reward and gold score", "held-out reward", (line("heldout_reward", label="held-out reward", style="o-"),),
          twin=line("gold_score", label="gold score", style="s--"), twin_ylabel="gold score"),
    Panel("KL to the reference (held-out)", "KL, nats per response", (line("kl_to_reference", label="held-out KL", style="o-"),)),
    Panel("Held-out reward (greedy)", "reward", (line("eval/mean_reward", label="held-out mean reward", style="o-"),),
          before=("start.mean_reward",), before_label="start policy"),
)
GENERIC = (_loss_panel(), LEARNING_RATE)

CURATED: dict[str, tuple[Panel, ...]] = {
    "sft": SUPERVISED, "classify": CLASSIFY, "rm": REWARD_MODEL,
    "dpo": PREFERENCE, "kto": PREFERENCE, "orpo": PREFERENCE, "online_dpo": PREFERENCE, "cpo": PREFERENCE,
    "simpo": PREFERENCE, "ppo": REINFORCEMENT, "grpo": REINFORCEMENT, "rloo": REINFORCEMENT,
}


def panels_for(stage: str | None, history: list[dict]) -> tuple[Panel, ...]:
    """The stage's curated panels; an unknown stage gets the set its logged keys match, else loss + learning rate."""
    if stage in CURATED:
        return CURATED[stage]
    keys = {k for entry in history for k in entry}
    if keys & {"rewards/margins", "eval_rewards/margins"}:
        return PREFERENCE
    if keys & {"objective/reward", "reward", "heldout_reward"}:
        return REINFORCEMENT
    return GENERIC


def series_points(history: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) for one key; a repeated step keeps its last value (the final evaluation repeats the last)."""
    points: dict[float, float] = {}
    for entry in history:
        step, value = entry.get("step"), entry.get(key)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
            points[step] = float(value)
    return sorted(points.items())


def _first_present(history, series: Series) -> tuple[str, list] | None:
    for key in series.keys:
        pts = series_points(history, key)
        if pts:
            return key, pts
    return None


def _before_value(metrics: dict | None, paths: tuple[str, ...]):
    for path in paths:
        group, _, key = path.partition(".")
        value = ((metrics or {}).get(group) or {}).get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _drawable(panel: Panel, history, metrics) -> bool:
    """A panel needs a curve (two points), or one point with a before-training value to set it against."""
    found = [f for f in (_first_present(history, s) for s in panel.series + ((panel.twin,) if panel.twin else ())) if f]
    if any(len(pts) >= 2 for _, pts in found):
        return True
    return bool(found) and _before_value(metrics, panel.before) is not None


def build_figure(history: list[dict], *, stage: str | None = None, metrics: dict | None = None, title: str = ""):
    """The matplotlib figure (None when nothing is worth drawing); tests inspect its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in panels_for(stage, history) if _drawable(p, history, metrics)]
    if not panels:
        return None
    cols = min(2 if len(panels) <= 4 else 3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.3 * rows), squeeze=False)
    x_label = "PPO update" if stage == "ppo" else "optimizer step"
    for ax, panel in zip(axes.flat, panels):
        _draw(ax, panel, history, metrics, x_label)
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _draw(ax, panel: Panel, history, metrics, x_label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    handles = []
    for series in panel.series:
        found = _first_present(history, series)
        if not found:
            continue
        key, pts = found
        xs, ys = zip(*pts)
        handles += ax.plot(xs, ys, series.style, ms=4, label=series.label, color=series.color)
        if panel.mark_best == key and len(pts) >= 2:
            step, value = min(pts, key=lambda p: p[1])
            handles += ax.plot([step], [value], "*", ms=13, color="tab:red", label=f"best: step {step:g} ({value:.4g})")
            ax.axvline(step, color="tab:red", alpha=0.25, lw=1)
    before = _before_value(metrics, panel.before)
    if before is not None:
        handles.append(ax.axhline(before, ls="--", color="0.35", lw=1.2, label=f"{panel.before_label}: {before:.4g}"))
    if panel.twin is not None:
        found = _first_present(history, panel.twin)
        if found:
            twin = ax.twinx()
            xs, ys = zip(*found[1])
            handles += twin.plot(xs, ys, panel.twin.style, ms=4, color="tab:orange", label=panel.twin.label)
            twin.set_ylabel(panel.twin_ylabel, fontsize=9)
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.ylabel, fontsize=9)
    ax.set_xlabel(x_label, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best")


def plot_curves(log_history: list[dict], path: str | Path, *, title: str = "", stage: str | None = None,
                metrics: dict | None = None) -> Path | None:
    """Write the stage's curated figure to `path` (None, and no file, when the history holds nothing to draw)."""
    import matplotlib.pyplot as plt

    fig = build_figure(log_history, stage=stage, metrics=metrics, title=title)
    if fig is None:
        return None
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def validation_figure(runs: list[tuple[str, list[dict]]], *, key: str = "eval_loss"):
    """`rlhf compare`: each run's validation curve of `key` on one axis (None when no run logged it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(name, series_points(history, key)) for name, history in runs]
    if not any(pts for _, pts in drawn):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, pts in drawn:
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", ms=4, label=name)
    ax.set_title(f"Validation {key.removeprefix('eval_').replace('_', ' ')} by run", fontsize=10)
    ax.set_xlabel("optimizer step", fontsize=9)
    ax.set_ylabel(key, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_validation_curves(runs: list[tuple[str, list[dict]]], path: str | Path, *, key: str = "eval_loss") -> Path | None:
    import matplotlib.pyplot as plt

    fig = validation_figure(runs, key=key)
    if fig is None:
        return None
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
