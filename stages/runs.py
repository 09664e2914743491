"""`rlhf runs [DIR]` lists finished stage outputs; `rlhf compare A B ...` puts their manifests side by side.

Both read only manifest.json (and metrics.json for curves), so they are instant and load no model: the
datasets, hyperparameters and model versions every stage records, made into something to look at.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .core import artifacts

SKIP_CONFIG = {"output_dir", "logging_dir", "run_name", "config_path", "force"}  # differ by nature, not by choice
# the figure that says how a stage did, per stage kind, in order of preference
KEY_METRICS = (("final", "eval_loss", "val loss"), ("base", "base_loss", "base loss"),
               ("final", "eval_accuracy", "pair acc"), ("start", "start_accuracy", "start acc"),
               ("final", "eval_rewards/accuracies", "reward acc"), ("final", "eval_rewards/margins", "margin"),
               ("final", "eval_macro_f1", "macro-F1"), ("final", "mean_reward", "heldout reward"),
               ("start", "mean_reward", "start reward"), ("final", "kl_to_reference", "KL"),
               ("", "win_rate", "win rate"))


def find_outputs(root: Path, depth: int = 4) -> list[Path]:
    """Finished stage outputs under root (root itself included), skipping the suite's hidden work dirs."""
    found, frontier = [], [root]
    for _ in range(depth + 1):
        nxt = []
        for d in frontier:
            if (artifacts.read_manifest(d) or {}).get("status") == artifacts.COMPLETE:
                found.append(d)
                continue  # a stage output holds no further outputs
            nxt += [p for p in sorted(d.iterdir()) if p.is_dir() and not p.name.startswith(".")] if d.is_dir() else []
        frontier = nxt
    return found


def key_metrics(manifest: dict) -> dict[str, float]:
    metrics = manifest.get("metrics") or {}
    out = {}
    for group, key, label in KEY_METRICS:
        value = (metrics.get(group) or {}).get(key) if group else metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[label] = value
    return out


def base_of(manifest: dict) -> str:
    if manifest.get("stage") == "evaluate":
        return f"{Path(str(manifest.get('policy'))).name} vs {Path(str(manifest.get('reference'))).name}"
    return Path(str(manifest.get("base_model") or (manifest.get("parent") or {}).get("path") or "?")).name


def data_of(manifest: dict) -> str:
    data = manifest.get("data") or {}
    names = [s.get("source") for s in data.get("sources", [])]
    if not names and manifest.get("prompts"):
        names = [(manifest["prompts"] or {}).get("source")]
    return ", ".join(str(n) for n in names if n) or "-"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def list_runs(root: Path) -> str:
    outputs = find_outputs(root)
    if not outputs:
        return f"no finished stage outputs under {root}"
    rows = []
    for p in outputs:
        m = artifacts.read_manifest(p) or {}
        from .report import finished_at

        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in key_metrics(m).items()) or "-"
        rows.append([finished_at(p), str(p.relative_to(root)) if p != root else str(p), m.get("stage", "?"),
                     base_of(m), data_of(m), metrics])
    rows.sort()
    return table(["finished", "output", "stage", "base", "data", "key metrics"], rows)


def runs_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rlhf runs", description="List finished stage outputs under DIR (default runs/).")
    p.add_argument("dir", nargs="?", default="runs")
    a = p.parse_args(argv)
    root = Path(a.dir).expanduser()
    if not root.is_dir():
        print(f"error: {root}: not a folder", file=sys.stderr)
        return 2
    print(list_runs(root))
    return 0


def flat_config(manifest: dict) -> dict:
    config = manifest.get("config") or {}
    return {k: v for group in config.values() if isinstance(group, dict) for k, v in group.items() if k not in SKIP_CONFIG}


def data_fingerprints(manifest: dict) -> dict:
    data = manifest.get("data") or {}
    prints = {f"{s.get('source')}": s.get("fingerprint") for s in data.get("sources", [])}
    prints.update({f"{s.get('source')} (validation)": s.get("fingerprint") for s in data.get("eval_sources", [])})
    if manifest.get("prompts"):
        prints["prompts"] = (manifest["prompts"] or {}).get("fingerprint")
    return prints


def validation_key(histories: list[list[dict]]) -> str | None:
    """eval_loss when every run has it, else the first validation metric they all logged."""
    from .report import is_bookkeeping

    shared = None
    for history in histories:
        keys = {k for e in history for k in e if (k.startswith("eval_") or k in ("heldout_reward", "eval/mean_reward"))
                and not is_bookkeeping(k)}
        shared = keys if shared is None else shared & keys
    if not shared:
        return None
    return "eval_loss" if "eval_loss" in shared else sorted(shared)[0]


def compare(paths: list[Path], plot_path: Path | None) -> str:
    from .core.errors import ConfigError

    manifests = []
    for p in paths:
        m = artifacts.read_manifest(p)
        if not m:
            raise ConfigError(f"{p}: no manifest.json (not a stage output)")
        manifests.append(m)
    names = [p.name if [q.name for q in paths].count(p.name) == 1 else str(p) for p in paths]
    out = [table(["", *names], [["stage", *(m.get("stage", "?") for m in manifests)],
                                ["base", *(base_of(m) for m in manifests)],
                                ["data", *(data_of(m) for m in manifests)],
                                ["fingerprint", *(str(m.get("fingerprint")) for m in manifests)]])]
    configs = [flat_config(m) for m in manifests]
    differ = sorted(k for k in set().union(*configs) if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1)
    out.append("\nhyperparameters that differ:" if differ else "\nhyperparameters: identical")
    if differ:
        out.append(table(["key", *names], [[k, *(_fmt(c.get(k, "-")) for c in configs)] for k in differ]))
    prints = [data_fingerprints(m) for m in manifests]
    data_differ = sorted(k for k in set().union(*prints) if len({p.get(k) for p in prints}) > 1)
    out.append("\ndata fingerprints that differ:" if data_differ else "\ndata: identical content")
    if data_differ:
        out.append(table(["data", *names], [[k, *(str(p.get(k) or "-")[:12] for p in prints)] for k in data_differ]))
    metrics = [key_metrics(m) for m in manifests]
    labels = [label for _, _, label in KEY_METRICS if any(label in m for m in metrics)]
    if labels:
        out.append("\nmetrics:")
        out.append(table(["metric", *names], [[k, *(_fmt(m.get(k, "-")) for m in metrics)] for k in labels]))
    if plot_path is not None:
        histories = []
        for p in paths:
            try:
                histories.append(json.loads((p / "metrics.json").read_text()).get("log_history") or [])
            except (OSError, ValueError):
                histories.append([])
        key = validation_key(histories)
        from .core.plots import plot_validation_curves

        drawn = plot_validation_curves(list(zip(names, histories)), plot_path, key=key) if key else None
        out.append(f"\nvalidation curves ({key}): {drawn}" if drawn else "\nvalidation curves: none logged by every run")
    return "\n".join(out)


def first_free(path: Path) -> Path:
    """`path`, or `stem-2.suffix`, `stem-3.suffix`, ... : the first name no file holds."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def compare_main(argv=None) -> int:
    from .core.errors import UserError

    p = argparse.ArgumentParser(prog="rlhf compare", description="Stage outputs side by side: differing hyperparameters "
                                "and data fingerprints, metrics, and one plot of their validation curves.")
    p.add_argument("outputs", nargs="+", metavar="OUTPUT")
    p.add_argument("--plot", default=None, help="where to draw the validation curves (default ./compare.png, or "
                   "compare-2.png, ... when that file exists: a file not named here is never overwritten; "
                   "'none' for no plot)")
    a = p.parse_args(argv)
    if len(a.outputs) < 2:
        print("error: rlhf compare needs at least two stage outputs", file=sys.stderr)
        return 2
    plot = None if a.plot == "none" else Path(a.plot) if a.plot else first_free(Path("compare.png"))
    try:
        print(compare([Path(x).expanduser() for x in a.outputs], plot))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
