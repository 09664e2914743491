"""Distributed set-up a stage does for itself before its trainer reads a DeepSpeed/FSDP config."""
from __future__ import annotations


def setup_distributed(training_args) -> None:
    """Called by every stage before building its trainer (see stage.prepare_training)."""
    return None
