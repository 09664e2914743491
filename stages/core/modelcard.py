"""Model cards (README.md) generated from a stage's manifest."""
from __future__ import annotations

from pathlib import Path


def write_model_card(out_dir: str | Path, manifest: dict) -> Path | None:
    """Called by save_artifact for every stage output, before the atomic rename."""
    return None
