"""Hardware decisions a stage makes for itself: device, precision, CPU threads.

The same recipe runs on CPU and GPU unchanged. TRL configs default to bf16, which TrainingArguments
refuses on a CPU-only machine unless `use_cpu` is set, and `accelerate launch` exports
OMP_NUM_THREADS=1 when it is unset, silently leaving a CPU run on one core. Both are handled here.
"""
from __future__ import annotations

import os
import sys
import traceback

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def on_cpu(training_args=None) -> bool:
    """Whether a run trains on the CPU: no GPU, or a recipe's `use_cpu: true` on a machine that has one. The CPU
    defaults (precision, eager attention, memory planning, padding) follow the device that trains, not the machine."""
    return not cuda_available() or bool(getattr(training_args, "use_cpu", False))


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmul (AVX512-BF16 or AMX); there autocast bf16 is fast."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - probe missing on this build
            pass
    return False


def choose_precision(requested: str, recipe: dict, explicit: set[str]) -> str:
    """Resolve `precision: auto` (or the recipe's bf16/fp16 flags) to what this hardware runs well."""
    if requested == "auto":
        if "fp16" in explicit and recipe.get("fp16"):
            requested = "fp16"
        elif "bf16" in explicit and recipe.get("bf16") is False:
            requested = "fp32"
        else:
            requested = "bf16"
    if not recipe.get("use_cpu") and cuda_available():
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            return "fp16"
        return requested
    if requested == "fp16":  # fp16 autocast on CPU is slow and poorly supported
        requested = "bf16"
    if requested == "bf16" and not cpu_supports_bf16():
        return "fp32"
    return requested


EAGER_MAX_LENGTH = 1024


def adjust_training_defaults(recipe: dict, explicit: set[str], *, precision: str = "auto") -> str:
    """Set device/precision/checkpointing defaults in the recipe dict before TrainingArguments validates them."""
    chosen = choose_precision(recipe.get("precision", precision), recipe, explicit)
    if not cuda_available() or recipe.get("use_cpu"):
        recipe["use_cpu"] = True
        # Small models on CPU have memory to spare; recomputation only costs time there.
        if "gradient_checkpointing" not in explicit:
            recipe["gradient_checkpointing"] = False
        # CPU SDPA's backward is slow on short rows: eager attention made a SmolLM2 LoRA step at ~110
        # tokens 1.2x faster (measured). Its S^2 attention weights grow with length, so long rows keep SDPA.
        if "attn_implementation" not in explicit and (recipe.get("max_length") or 1024) <= EAGER_MAX_LENGTH:
            recipe["attn_implementation"] = "eager"
    recipe["bf16"] = chosen == "bf16"
    recipe["fp16"] = chosen == "fp16"
    if "report_to" not in explicit:
        recipe["report_to"] = ["tensorboard"]
    return chosen


# What a decoder layer keeps for backward, per token, counted with torch's saved-tensor hooks on SmolLM2-135M
# (LoRA all-linear; README, Speed): 14 bytes per unit of hidden + MLP width under bf16 autocast (29.6 KB on
# SmolLM2), 21 in fp32; eager attention adds its softmax for every key position: 5.6 bytes per head and key
# in bf16 (the measured slope between 128- and 400-token rows; the fp32 probabilities and their bf16 copy),
# 4 in fp32; fused attention (SDPA, flash, flex) none.
# Resident memory grows by 1.25x the saved bytes (allocator slack: 59 KB measured where 48 KB are saved).
SAVED_BYTES_PER_WIDTH = {True: 14.0, False: 21.0}
EAGER_BYTES_PER_HEAD_AND_KEY = {True: 5.6, False: 4.0}
RESIDENT_PER_SAVED_BYTE = 1.25
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")


def activation_rates(model_config, *, half: bool = True) -> tuple[float, float]:
    """(bytes per token, bytes per token and key position) one decoder layer keeps for backward: a micro-batch
    of `rows` rows of `length` tokens costs rows * length * (per_token + per_key * length) per layer."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = getattr(cfg, "hidden_size", 0) or 0
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    per_token = RESIDENT_PER_SAVED_BYTE * SAVED_BYTES_PER_WIDTH[half] * (hidden + inter)
    # "paged|sdpa" is SDPA over a paged cache; anything unknown is planned as eager, the costlier kind
    eager = str(getattr(cfg, "_attn_implementation", None)).split("|")[-1] not in FUSED_ATTENTION
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    return per_token, (RESIDENT_PER_SAVED_BYTE * EAGER_BYTES_PER_HEAD_AND_KEY[half] * heads if eager else 0.0)


def activation_bytes(model_config, rows: int, length: int, *, half: bool = True) -> int:
    """Bytes of activations kept for backward without checkpointing, for a micro-batch of `rows` rows padded
    to `length` tokens (eager attention's softmax grows with the square of the length)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    per_token, per_key = activation_rates(model_config, half=half)
    return int((getattr(cfg, "num_hidden_layers", 0) or 0) * rows * length * (per_token + per_key * length))


def available_memory() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


DEFAULT_BUDGET_SHARE, DEFAULT_BUDGET_CAP = 0.25, 2**29


def memory_budget(requested_gb: float | None, available: int | None = None) -> int:
    """Bytes the activations kept for backward may take: the recipe's `memory_budget_gb`, else a quarter of
    the available memory, at most 0.5 GiB. A fixed, modest default keeps a stage's footprint below its peers'
    (TRL and LLaMA-Factory checkpoint every layer) instead of growing into whatever RAM is free; with
    micro-batches (stage.split_batch_for_memory) it holds a large part of each forward's layers anyway
    (real-length reward pairs: 1 GiB -> 0.5 GiB cut peak RSS 3.44 -> 2.90 GB for 1.09x the step time)."""
    if requested_gb is not None:
        return int(requested_gb * 2**30)
    available = available_memory() if available is None else available
    return int(min(DEFAULT_BUDGET_CAP, DEFAULT_BUDGET_SHARE * available) if available else DEFAULT_BUDGET_CAP)


def layers_without_checkpointing(model_config, rows: int, length: int, budget: int, *, half: bool = True) -> int:
    """How many decoder layers may keep their activations for a micro-batch of `rows` rows of `length` tokens
    within `budget` bytes (the rest are checkpointed: only their inputs are kept and they are recomputed)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    return layers_within(budget, activation_bytes(model_config, rows, length, half=half) / max(layers, 1), layers)


def layers_within(budget: float, per_layer: float, layers: int) -> int:
    """How many of `layers` layers costing `per_layer` bytes each fit `budget` (all of them when they cost nothing)."""
    return layers if per_layer <= 0 else max(0, min(layers, int(budget // per_layer)))


def configure_threads(num_threads: int | None = None) -> int:
    """Use every core on CPU runs, unless the recipe says otherwise.

    Under `accelerate launch`, OMP_NUM_THREADS=1 is exported when unset; we treat that value as
    accelerate's, not the user's, and spread the cores over the local processes instead.
    """
    if num_threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        omp = os.environ.get("OMP_NUM_THREADS")
        launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
        if omp and not (launched and omp == "1"):
            num_threads = int(omp)
        else:
            num_threads = max(1, (os.cpu_count() or 1) // max(local, 1))
    if not cuda_available():
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Make glibc hand freed tensor memory back to the system (CPU runs on Linux).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so activation-sized
    tensors (1-30 MiB) soon come from the heap, and a heap that held one step's activations stays as large
    as its fragmented peak: on real-length rows the reward stage's peak RSS went from 2.4 GB in its first step
    to 4.8 GB by its second. A fixed 1 MiB threshold serves every block of 1 MiB or more with its own mapping,
    unmapped when freed: peak RSS stays that of the live tensors (README "Where the memory goes"). The price is
    a page fault per page of every such block, every time: opt-in (`return_freed_memory: true`), not a default.
    Returns whether the setting was applied (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or os.name != "posix":
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators differ
        return False


def leave_distributed(exit_code: int) -> int:
    """End a launched rank's process once its stage has finished, with `exit_code`.

    Returns `exit_code` unchanged in a process that never joined a process group (a single-process run, a test).
    A rank tears its process group down (after success only), waits for its threads, runs the exit handlers
    (atexit, weakref finalizers), flushes its output and leaves with `os._exit`, skipping only the C-level
    finalization after them. There,
    under ZeRO-3 on CPU, a rank that finished before its peers (the main rank still writing the artifact)
    sometimes aborted in a C++ destructor with "terminate called without an active exception" (exit -6, no
    Python frame left; 2 of about 90 launches on 2 busy cores, and three CI runs on 2026-12-07). The launcher then
    killed the main rank before it had written the artifact. Tearing the group down first did not stop it."""
    import atexit
    import threading

    if not in_process_group():
        return exit_code
    if exit_code == 0:  # a failed rank leaves at once: its peers may still wait in a collective (NCCL's teardown is one)
        import torch.distributed as dist

        try:
            dist.destroy_process_group()
        except Exception:  # the artifact stands, but a failed teardown still fails the launch
            traceback.print_exc()
            exit_code = 1
    if not launched_rank():  # a process group this process opened itself (a test): leave it to the caller
        return exit_code
    threading._shutdown()  # what an ordinary exit does first: wait for non-daemon threads (a tracker's uploads)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(exit_code)


def in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def launched_rank() -> bool:
    """Whether a launcher (torchrun, accelerate launch, deepspeed, the SLURM script) started this process as a rank."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def derived_choices(training_args) -> dict:
    """What the stage decided from the machine: recorded in the manifest, never part of the fingerprint."""
    keys = ("bf16", "fp16", "use_cpu", "gradient_checkpointing", "padding_free", "precompute_ref_log_probs", "train_sampling_strategy",
            "attn_implementation")
    out = {k: getattr(training_args, k) for k in keys if hasattr(training_args, k)}
    out.update(device="cpu" if on_cpu(training_args) else "cuda", threads=torch.get_num_threads(),
               world_size=int(os.environ.get("WORLD_SIZE", "1") or 1))
    return out
