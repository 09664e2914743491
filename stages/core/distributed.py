"""Distributed set-up a stage does for itself, so the same stage runs on one CPU, N CPU processes,
or N GPUs under DDP or DeepSpeed ZeRO. Launchers (accelerate launch, torchrun, srun) start the
processes; this module only fills the gaps the libraries leave:

- DeepSpeed compiles its ops (comm, CPU Adam) on first use, ~50-200 s: TORCH_EXTENSIONS_DIR
  defaults to a persistent cache (`<cache_dir>/torch_extensions`), set on import because ZeRO-3
  model loading may build them before any stage code runs.
- On CPU, accelerate sets up gloo with torch.distributed but not DeepSpeed's own comm layer, so
  DeepSpeed reads its config as if world size were 1 and asserts "train_batch_size is not equal to
  micro_batch_per_gpu * gradient_acc_step * world_size": `join_deepspeed_comm` joins it to gloo,
  before ZeRO-3 model loading (`zero3_loading`) and before the trainer (`setup_distributed`).
- ZeRO-3 saves only what `stage3_gather_16bit_weights_on_model_save` gathers: without it a saved
  model or LoRA adapter is empty, so it is switched on (and said so) whatever the JSON says.
- An evaluation before train() breaks distributed training: under DDP accelerate marks the model
  "prepared" during that evaluation and train() then skips the DDP wrapper, so the ranks train
  apart, never syncing gradients (measured: grad norm 0.065 instead of 0.081 at step 1); ZeRO-1/2
  refuse to evaluate; ZeRO-3 builds an inference engine and training crashes in backward.
  `at_train_start` runs such an evaluation at the start of training instead, once the model is wrapped.
- An earlier stage's LoRA is merged into its base on load (policy.load_model); under ZeRO-3 the
  base would load partitioned (zero.Init: empty local tensors) and the merge fail, so
  `zero3_loading` loads such a model whole; DeepSpeed partitions it when training starts.
- QLoRA under ZeRO-3 partitions the 4-bit weights only when they are stored in the compute dtype:
  `quant_storage_dtype()` gives the `bnb_4bit_quant_storage` to use.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path

GATHER_ON_SAVE = "stage3_gather_16bit_weights_on_model_save"


def extensions_dir() -> str:
    """Where DeepSpeed/torch compile their C++ ops: $TORCH_EXTENSIONS_DIR, else a persistent cache dir."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        from .models import cache_dir

        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_dir() / "torch_extensions")
    return os.environ["TORCH_EXTENSIONS_DIR"]


extensions_dir()  # at import: ZeRO-3 model loading (zero.Init) may build ops before setup_distributed runs


def deepspeed_config(training_args) -> dict | None:
    """The DeepSpeed config dict this run trains under (None when DeepSpeed is off)."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    return None if plugin is None else plugin.deepspeed_config


def join_deepspeed_comm(training_args=None) -> None:
    """On CPU, in a launched run (WORLD_SIZE set), initialise DeepSpeed's comm on gloo. Idempotent.

    On GPUs accelerate does this itself (nccl); a single un-launched process is left to DeepSpeed.
    """
    from .runtime import on_cpu

    if not on_cpu(training_args) or "WORLD_SIZE" not in os.environ:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def quant_storage_dtype(compute_dtype):
    """`bnb_4bit_quant_storage` for QLoRA: the compute dtype under ZeRO-3 (so 4-bit weights shard), else None.

    Transformers loads a 4-bit model under ZeRO-3 only when the packed weights have the same storage
    dtype as the rest of the model; ZeRO-2 and plain DDP need nothing.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    return compute_dtype if is_deepspeed_zero3_enabled() else None


def setup_distributed(training_args) -> None:
    """Called by every stage before building its trainer (see stage.prepare_training). Idempotent."""
    extensions_dir()
    cfg = deepspeed_config(training_args)
    if cfg is None:
        return
    join_deepspeed_comm(training_args)
    zero = cfg.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0) or 0) == 3 and not zero.get(GATHER_ON_SAVE):
        zero[GATHER_ON_SAVE] = True
        hf = getattr(training_args, "hf_deepspeed_config", None)
        if hf is not None and hf.config is not cfg:
            hf.config.setdefault("zero_optimization", {})[GATHER_ON_SAVE] = True
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[distributed] ZeRO-3: {GATHER_ON_SAVE} switched on, or the saved model/adapter would be empty",
                  flush=True)


def at_train_start(evaluate_before):
    """Wrap stage.evaluate_before(trainer, ...): in a distributed run (several processes, or DeepSpeed),
    before train() has wrapped the model, run it at on_train_begin instead and return its metrics
    dict, filled in place by then (the stages read these metrics only after training). A single
    process evaluates at once, unchanged."""

    @functools.wraps(evaluate_before)
    def wrapper(trainer, *args, **kwargs):
        distributed = getattr(trainer, "is_deepspeed_enabled", False) or trainer.args.world_size > 1
        if not distributed or trainer.is_in_train:
            return evaluate_before(trainer, *args, **kwargs)
        if trainer.eval_dataset is None:
            return None
        from transformers import TrainerCallback

        metrics: dict = {}

        class _AtTrainBegin(TrainerCallback):  # stays registered (the handler is iterating); runs once
            done = False

            def on_train_begin(self, args_, state, control, **kw):
                if not self.done:
                    self.done = True
                    metrics.update(evaluate_before(trainer, *args, **kwargs) or {})

        trainer.add_callback(_AtTrainBegin())
        return metrics

    return wrapper


@contextmanager
def whole_weights():
    """Inside this block transformers loads models whole, not ZeRO-3-partitioned (zero.Init off)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)  # what is_deepspeed_zero3_enabled() reads
    cfg = ref() if ref is not None else None
    if cfg is None:
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(cfg)


def zero3_loading(load_model):
    """Wrap policy.load_model(name_or_path, ...) for ZeRO-3: DeepSpeed's comm is joined before zero.Init
    reads the config, and an adapter directory (merged into its base on load) is loaded whole.
    Without ZeRO-3 it is called unchanged."""

    @functools.wraps(load_model)
    def wrapper(name_or_path, *args, **kwargs):
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():
            return load_model(name_or_path, *args, **kwargs)
        join_deepspeed_comm()
        if (Path(str(name_or_path)) / "adapter_config.json").is_file():
            with whole_weights():
                return load_model(name_or_path, *args, **kwargs)
        return load_model(name_or_path, *args, **kwargs)

    return wrapper
