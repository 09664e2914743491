"""Selective activation checkpointing: recompute only as many decoder layers as the memory budget needs.

transformers checkpoints all decoder layers or none. Its layers (`GradientCheckpointingLayer`) each carry a
`gradient_checkpointing` flag, so once the Trainer has enabled checkpointing (before `on_train_begin`),
turning the flag off on some layers keeps their activations and skips their recomputation. Exact: a
checkpointed layer recomputes the same values (tests/test_memory_budget.py).
"""
from __future__ import annotations

from transformers import TrainerCallback


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def keep_activations(model, count: int) -> int:
    """Turn checkpointing off on the last `count` checkpointed layers; returns how many were changed."""
    layers = [m for m in decoder_layers(model) if getattr(m, "gradient_checkpointing", False)]
    chosen = layers[len(layers) - count:] if count > 0 else []
    for layer in chosen:
        layer.gradient_checkpointing = False
    return len(chosen)


class SelectiveCheckpointing(TrainerCallback):
    def __init__(self, uncheckpointed: int):
        self.uncheckpointed = uncheckpointed

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and args.gradient_checkpointing:
            keep_activations(model, self.uncheckpointed)
