"""`rlhf lineage RUN/STAGE`: the chain of stage outputs back to the base model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.artifacts import read_manifest

KEY_CONFIG = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "max_length", "beta",
              "loss_type")


def walk(path: str) -> list[tuple[str, dict | None]]:
    """[(path, manifest)] from this stage back to the first model that is not a stage output."""
    chain, seen = [], set()
    current = str(Path(path).resolve())
    while current and current not in seen:
        seen.add(current)
        m = read_manifest(current) if Path(current).is_dir() else None
        chain.append((current, m))
        if not m:
            break
        current = (m.get("parent") or {}).get("path")
    return chain


def _metrics(m: dict) -> str:
    met = m.get("metrics") or {}
    fin, base, start = met.get("final") or {}, met.get("base") or {}, met.get("start") or {}
    parts = []
    if "eval_loss" in fin:
        parts.append(f"eval_loss {fin['eval_loss']:.4f}" + (f" (base {base['base_loss']:.4f})" if "base_loss" in base else ""))
    for k in ("eval_accuracy", "eval_rewards/accuracies", "eval_rewards/margins"):
        if k in fin:
            s = start.get("start_" + k[5:])
            parts.append(f"{k[5:]} {fin[k]:.3f}" + (f" (start {s:.3f})" if isinstance(s, (int, float)) else ""))
    return ", ".join(parts) or "-"


def format_lineage(path: str) -> str:
    lines = []
    for depth, (p, m) in enumerate(walk(path)):
        pad = "  " * depth
        if not m:
            lines.append(f"{pad}{p}  [base model]")
            continue
        cfg = (m.get("config") or {}).get("training") or {}
        data = m.get("data") or {}
        lines.append(f"{pad}{p}  [{m.get('stage')}, {m.get('peft_method')}, fingerprint {m.get('fingerprint')}]")
        for src in data.get("sources", []):
            lines.append(f"{pad}  data: {src.get('source')} rows {src.get('rows_kept')} fp {str(src.get('fingerprint'))[:12]}")
        keys = ", ".join(f"{k}={cfg[k]}" for k in KEY_CONFIG if cfg.get(k) not in (None, -1))
        lines.append(f"{pad}  config: {keys}")
        lines.append(f"{pad}  metrics: {_metrics(m)}")
        if m.get("merged_adapter"):
            lines.append(f"{pad}  started from (merged): {m['merged_adapter']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rlhf lineage", description="Print a stage output's lineage back to the base model.")
    p.add_argument("stage_dir")
    a = p.parse_args(argv)
    if not read_manifest(a.stage_dir):
        print(f"error: {a.stage_dir}: no manifest.json (not a stage output)", file=sys.stderr)
        return 2
    print(format_lineage(a.stage_dir))
    return 0
