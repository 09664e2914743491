"""CPU fast paths under TRL's trainers, each measured by `make bench` and checked against TRL's own result.

- `compact_lm_head`: TRL's SFT and DPO trainers score tokens through a chunked LM-head kernel. On GPUs
  it is a Triton kernel over the labelled positions only; on CPU its fallback runs small torch ops tile
  by tile over every position (prompt tokens included) and took a third of an SFT step on SmolLM2.
  This path projects only the labelled positions, in one bf16 matmul under autocast, and returns the
  same fields (tests/test_fastpath.py compares them with TRL's). Entropy, top-1 and mean logit are
  logging-only here (no gradient), as they are in SFT and DPO.
- `bf16_frozen_weights`: with LoRA-style methods the base weights are frozen, and autocast re-casts
  every fp32 weight to bf16 on every forward and backward (frozen tensors are not cached). Storing the
  frozen Linear weights in bf16 gives the same matmuls without the casts and halves their memory.
  transformers maps a safetensors file into memory and its fp32 tensors are views of that mapping, so
  every page the cast reads stays resident while any tensor (the embedding, a norm) still points into
  the file: the frozen tensors left in the mapping are copied into ordinary memory, and the whole file
  leaves the process (SmolLM2-135M: 0.4 GB of resident pages).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import types

import torch

_log = logging.getLogger(__name__)


def _supported(model) -> bool:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return (text is cfg and getattr(text, "final_logit_softcapping", None) is None
            and getattr(text, "logit_scale", None) in (None, 1.0) and getattr(text, "output_multiplier", None) is None
            and getattr(text, "logits_scaling", None) is None and getattr(text, "lm_head_multiplier", None) is None
            and not getattr(text, "output_router_logits", False)
            and getattr(model.get_output_embeddings(), "bias", None) is None)


# What the compact path computes; a request for any other FusedCausalLMOutput field goes to TRL.
COMPUTED = ("log_probs", "entropy", "mean_logits", "is_top1")
# Per-call flags TRL's backbone honours but this path would drop: such calls go to TRL too.
_STEP_ASIDE_FLAGS = ("output_attentions", "output_hidden_states", "output_router_logits")


def trl_request(forward) -> dict | None:
    """The add_fused_lm_head arguments (outputs, temperature, cast_lm_head_to_fp32) closed over by TRL's
    patched forward, or None if `forward` is not one (TRL private internals, pinned by tests/test_fastpath.py)."""
    fn = getattr(forward, "__func__", forward)
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or code.co_name != "_fused_forward" or not cells:
        return None
    free = dict(zip(code.co_freevars, cells))
    try:
        return {k: free[k].cell_contents for k in ("outputs", "temperature", "cast_lm_head_to_fp32")}
    except (KeyError, ValueError):
        return None


def compact_lm_head(model) -> bool:
    """Replace TRL's fused LM head on `model` (already patched by TRL) with the compact CPU path.

    Not installed when TRL was asked for a field this path does not compute (log_sum_sq_probs, for DPO's
    use_weighting), a temperature or an fp32 head; per call, anything else it does not handle (CUDA,
    shift_labels, output_* flags, calls without fused_lm_head) goes to TRL. Returns whether it was installed.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    if not _supported(model) or getattr(model, "_rlhf_compact_lm_head", False):
        return False
    trl_forward = model.forward
    request = trl_request(trl_forward)
    if request is None:
        _log.info("fastpath: %s.forward is not TRL's fused LM head; compact LM head not installed", type(model).__name__)
        return False
    if request["temperature"] != 1.0 or request["cast_lm_head_to_fp32"]:
        return False
    wanted = tuple(request["outputs"])
    if any(f not in COMPUTED for f in wanted):  # e.g. DPO use_weighting asks for log_sum_sq_probs: TRL's forward stays
        return False

    @functools.wraps(type(model).forward)  # keep the signature: generate() inspects it (position_ids, logits_to_keep)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        # `self is not model`: the function was re-bound to another module (PEFT's disable_adapter for prompt
        # learning sets PeftModel.forward to this method and accelerate re-binds its __func__ to the PeftModel,
        # whose base_model is the whole causal LM, not the transformer body): TRL's bound forward is right there
        if (self is not model or not fused_lm_head or shift_labels is not None or labels is None or ids is None
                or ids.device.type != "cpu" or kwargs.get("return_dict") is False
                or any(kwargs.get(f) for f in _STEP_ASIDE_FLAGS)):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        target = labels[mask]
        head = self.get_output_embeddings()
        picked, extra = chunked_log_probs(hidden[mask], head.weight, target, wanted)

        def full(x):
            return None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)

        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-picked.sum() / denom, log_probs=full(picked), entropy=full(extra["entropy"]),
                                   log_sum_sq_probs=None, mean_logits=full(extra["mean_logits"]),
                                   is_top1=full(extra["is_top1"]), label_mask=mask, aux_loss=None)

    model.forward = types.MethodType(forward, model)
    model._rlhf_compact_lm_head = True
    return True


# [chunk x vocab] fp32 tiles: 25 MB for a 49k vocabulary. They live at the end of the forward, when every activation
# does: 512-position tiles raised the real-length SFT peak by 0.27 GB, and were no faster once the weight is cast once
HEAD_CHUNK_TOKENS = 128


def chunked_log_probs(hidden, weight, target, wanted=COMPUTED, chunk: int | None = None):
    """log p(target) per labelled position, plus the logging-only fields in `wanted` (entropy, is_top1,
    mean_logits; None when not wanted), without ever holding a `[tokens x vocab]` tensor: the LM head runs
    over `chunk` positions at a time and its backward recomputes each tile (one extra head matmul) instead of
    saving the tiles. Under bf16 autocast the matmul runs in bf16, as nn.Linear's would; the softmax is fp32."""
    flags = tuple(k in wanted for k in _EXTRA)
    picked, *extra = _ChunkedLogProbs.apply(hidden, weight, target, chunk or HEAD_CHUNK_TOKENS, flags)
    return picked, {k: v if flag else None for k, v, flag in zip(_EXTRA, extra, flags)}


_EXTRA = ("entropy", "is_top1", "mean_logits")


def _autocast_dtype():
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def _tile(hidden, weight, dtype):
    """Logits of one tile in the matmul dtype (bf16 under autocast; `weight` already in it)."""
    with torch.autocast("cpu", enabled=False):
        return hidden.to(dtype or hidden.dtype) @ weight.T


class _ChunkedLogProbs(torch.autograd.Function):
    """The head weight is cast to the matmul dtype once per forward and that copy serves the backward too
    (a 49k x 576 fp32 head took 20 ms per cast, three per micro-batch: a third of the head's time); the
    softmaxes read the bf16 tile in fp32 directly (`dtype=float32`) instead of copying it to fp32 first."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk, flags):
        dtype = _autocast_dtype()
        head = weight.to(dtype or hidden.dtype)  # no copy when the dtypes match
        out = {k: [] for k in ("picked", *_EXTRA)}
        with torch.autocast("cpu", enabled=False):  # the reductions stay fp32 (autocast would run vecdot in bf16)
            for start in range(0, hidden.shape[0], chunk):
                logits, t = _tile(hidden[start:start + chunk], head, dtype), target[start:start + chunk]
                logp = logits.log_softmax(-1, dtype=torch.float32)
                out["picked"].append(logp.gather(-1, t[:, None]).squeeze(-1))
                if flags[0]:
                    out["entropy"].append(-torch.linalg.vecdot(logp.exp(), logp))
                if flags[1]:
                    out["is_top1"].append(logits.argmax(-1) == t)
                if flags[2]:
                    out["mean_logits"].append(logits.mean(-1, dtype=torch.float32))
                del logits, logp
        ctx.save_for_backward(hidden, weight, target)
        ctx.chunk, ctx.dtype, ctx.head = chunk, dtype, head
        empty = {"is_top1": hidden.new_zeros(0, dtype=torch.bool)}
        results = [torch.cat(v) if v else empty.get(k, hidden.new_zeros(0, dtype=torch.float32)) for k, v in out.items()]
        ctx.mark_non_differentiable(*results[1:])
        return tuple(results)

    @staticmethod
    def backward(ctx, grad, *_):
        hidden, weight, target = ctx.saved_tensors
        head, ctx.head = ctx.head, None  # released: the copy would otherwise live through every layer's backward
        if head is None:  # a second backward (retain_graph)
            head = weight.to(ctx.dtype or hidden.dtype)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        mm = ctx.dtype or hidden.dtype
        with torch.autocast("cpu", enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk):
                h, t = hidden[start:start + ctx.chunk], target[start:start + ctx.chunk]
                # d log p(t) / d logits = onehot(t) - softmax(logits), scaled by the incoming gradient
                g = _tile(h, head, ctx.dtype).softmax(-1, dtype=torch.float32).neg_()
                g[torch.arange(len(t)), t] += 1
                g = g.mul_(grad[start:start + ctx.chunk, None]).to(mm)
                if grad_hidden is not None:
                    grad_hidden[start:start + ctx.chunk] = (g @ head).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (g.T @ h.to(mm)).float()
        return grad_hidden, (grad_weight.to(weight.dtype) if grad_weight is not None else None), None, None, None


@contextlib.contextmanager
def during_init(trainer_cls, *, bf16: bool, lm_head: bool = True, frozen_bf16: bool = True, cpu: bool | None = None):
    """While a TRL trainer is built, its own `add_fused_lm_head` call also installs the CPU fast paths,
    so the work TRL does in `__init__` (precomputed reference log-probs) has the numerics of training.
    `cpu`: whether the run trains on the CPU (runtime.on_cpu: also `use_cpu` on a GPU machine); None asks the machine."""
    from .runtime import on_cpu

    cpu = on_cpu() if cpu is None else cpu
    mod = next((sys.modules[c.__module__] for c in trainer_cls.__mro__
                if hasattr(sys.modules.get(c.__module__), "add_fused_lm_head")), None)
    if mod is None:
        _log.warning("fastpath: no add_fused_lm_head in the modules of %s (TRL changed?); CPU fast paths not installed",
                     trainer_cls.__name__)
        yield
        return
    original = mod.add_fused_lm_head

    def patched(model, *args, **kwargs):
        original(model, *args, **kwargs)
        if cpu and _on_cpu(model):
            if lm_head:
                compact_lm_head(model)  # reads TRL's own arguments; steps aside for what it does not compute
            if bf16 and frozen_bf16:
                bf16_frozen_weights(model)

    mod.add_fused_lm_head = patched
    try:
        yield
    finally:
        mod.add_fused_lm_head = original


def _on_cpu(model) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu"


def install(trainer, *, lm_head: bool = True, frozen_bf16: bool = True) -> list[str]:
    """Apply the CPU fast paths to a TRL trainer's model (and reference); returns what was applied."""
    from .runtime import on_cpu

    applied = set()
    if not on_cpu(trainer.args):
        return []
    for m in (trainer.model, getattr(trainer, "ref_model", None)):
        if m is None or not isinstance(m, torch.nn.Module):
            continue
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        if not _on_cpu(base):
            continue
        if lm_head and (compact_lm_head(base) or getattr(base, "_rlhf_compact_lm_head", False)):
            applied.add("compact LM head")
        if getattr(trainer.args, "bf16", False) and frozen_bf16:
            bf16_frozen_weights(base)
            if any(getattr(m, "_rlhf_bf16", False) for m in base.modules()):
                applied.add("bf16 frozen weights")
    return sorted(applied)


def bf16_frozen_weights(model) -> int:
    """Store frozen nn.Linear weights in bf16 (CPU autocast runs); returns how many tensors were cast.

    The output embedding is left alone: it is usually tied to the input embedding, whose output feeds
    the fp32 residual stream.
    """
    skip = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not skip:
            w = module.weight
            if not w.requires_grad and w.dtype == torch.float32 and w.device.type == "cpu" and not hasattr(w, "ds_id"):
                w.data = w.data.to(torch.bfloat16)
                module._rlhf_bf16 = True
                module.register_forward_pre_hook(_match_weight_dtype)
                module.register_forward_hook(_restore_dtype)
                n += 1
    if n:
        release_mapped_weights(model)
    return n


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges mapped from files (Linux /proc/self/maps; empty elsewhere)."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        # a file's inode and path; shared memory (/dev/shm, memfd) is meant to stay shared
        if fields[4:5] != ["0"] and path.startswith("/") and not path.startswith(("/dev/", "/memfd:")):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_mapped_weights(model) -> int:
    """Copy frozen CPU tensors that still point into a memory-mapped weights file into ordinary memory
    (ties kept: a shared Parameter is one object), so the file's pages stop counting against the process
    once nothing references them. Returns how many tensors were copied."""
    ranges = _file_mappings()
    if not ranges:
        return 0
    n = 0
    tensors = [*model.parameters(), *model.buffers()]
    for t in {id(t): t for t in tensors}.values():
        if t.device.type != "cpu" or t.requires_grad or hasattr(t, "ds_id"):
            continue
        ptr = t.untyped_storage().data_ptr()
        if any(start <= ptr < end for start, end in ranges):
            t.data = t.data.clone()
            n += 1
    return n


def _match_weight_dtype(module, args):
    """Outside autocast (generation in a callback, say) feed the bf16 weight a bf16 input."""
    x = args[0]
    if torch.is_autocast_enabled("cpu") or x.dtype == module.weight.dtype:
        return None
    module._rlhf_in_dtype = x.dtype
    return (x.to(module.weight.dtype), *args[1:])


def _restore_dtype(module, args, output):
    dtype = module.__dict__.pop("_rlhf_in_dtype", None)
    return output.to(dtype) if dtype is not None else None
