"""Selective activation checkpointing, sized per batch against the memory budget.

transformers checkpoints every decoder layer or none (or every n-th). Its layers
(`GradientCheckpointingLayer`) each carry a `gradient_checkpointing` flag read at forward time, so once
the Trainer has enabled checkpointing (before `on_train_begin`), turning the flag off on some layers
keeps their activations and skips their recomputation. Here that choice is made per training forward,
from the rows the batch really holds (their count and padded length: eager attention's softmax grows with
the square of the length): a short batch (length-grouped batches are mostly short) keeps every layer's
activations and recomputes nothing, a worst-case batch checkpoints as many layers as needed to stay within
`memory_budget_gb`. Exact: a checkpointed layer recomputes the same values
(tests/test_memory_budget.py).
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from . import runtime


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def keep_activations(layers: list, count: int) -> None:
    """Checkpoint all but the last `count` layers."""
    first_kept = len(layers) - max(0, min(count, len(layers)))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < first_kept


def layers_to_keep(budget: int, bytes_per_token_and_layer: float, tokens: int, layers: int,
                   bytes_per_token_key_and_layer: float = 0.0, length: int = 0) -> int:
    """How many layers' activations fit `budget` for `tokens` tokens in rows of `length` (eager attention's
    softmax adds `bytes_per_token_key_and_layer` per token and key position)."""
    if tokens <= 0:
        return layers
    return runtime.layers_within(budget, tokens * (bytes_per_token_and_layer + bytes_per_token_key_and_layer * length), layers)


class SelectiveCheckpointing(TrainerCallback):
    """Before each training forward, keep as many layers' activations as `budget` bytes hold for its rows
    (runtime.activation_rates: a cost per token, plus one per token and key position under eager attention)."""

    def __init__(self, budget: int, bytes_per_token_and_layer: float, bytes_per_token_key_and_layer: float = 0.0):
        self.budget, self.per_token, self.per_key = budget, bytes_per_token_and_layer, bytes_per_token_key_and_layer
        self.kept: list[int] = []  # per training forward, how many layers kept their activations

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not args.gradient_checkpointing:
            return
        layers = decoder_layers(model)
        if not layers:
            return

        def plan(module, positional, named):
            if not (module.training and torch.is_grad_enabled()):
                return
            ids = named.get("input_ids", positional[0] if positional else None)
            if ids is None:
                ids = named.get("inputs_embeds")
            rows, length = (int(ids.shape[0]), int(ids.shape[1])) if ids is not None and ids.dim() >= 2 else (0, 0)
            keep = layers_to_keep(self.budget, self.per_token, rows * length, len(layers), self.per_key, length)
            keep_activations(layers, keep)
            self.kept.append(keep)

        model.register_forward_pre_hook(plan, with_kwargs=True)
