"""Distributed set-up a stage does for itself before its trainer reads a DeepSpeed/FSDP config.

Launchers (accelerate launch, torchrun, srun) start the processes; this module only fills the gaps
the libraries leave, so the same stage runs on one CPU, N CPU processes, or N GPUs under ZeRO:

- DeepSpeed compiles its ops (comm, CPU Adam) on first use, ~50-110 s: TORCH_EXTENSIONS_DIR
  defaults to a persistent cache (`<cache_dir>/torch_extensions`) so that happens once per machine.
- On CPU, accelerate sets up gloo with torch.distributed but not DeepSpeed's own comm layer, so
  DeepSpeed reads its config as if world size were 1 and the "train_batch_size is not equal to
  micro_batch_per_gpu * gradient_acc_step * world_size" assertion fires: join it to gloo first.
- ZeRO-3 saves only what `stage3_gather_16bit_weights_on_model_save` gathers: without it a saved
  model or LoRA adapter is empty, so it is switched on (and said so) whatever the JSON says.
- Trainer.evaluate() before train() fails under DeepSpeed (ZeRO-1/2 refuse; ZeRO-3 builds an
  inference engine and training then crashes in backward): `when_engine_built` runs such an
  evaluation at the start of training instead, once the engine exists.
- QLoRA under ZeRO-3 partitions the 4-bit weights only when they are stored in the compute dtype:
  `quant_storage_dtype()` gives the `bnb_4bit_quant_storage` to use.
"""
from __future__ import annotations

import os

GATHER_ON_SAVE = "stage3_gather_16bit_weights_on_model_save"


def extensions_dir() -> str:
    """Where DeepSpeed/torch compile their C++ ops: $TORCH_EXTENSIONS_DIR, else a persistent cache dir."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        from .models import cache_dir

        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_dir() / "torch_extensions")
    return os.environ["TORCH_EXTENSIONS_DIR"]


extensions_dir()  # at import: ZeRO-3 model loading (zero.Init) may build ops before setup_distributed runs


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def deepspeed_config(training_args) -> dict | None:
    """The DeepSpeed config dict this run trains under (None when DeepSpeed is off)."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is None:
        return None
    return plugin.deepspeed_config


def zero_stage(training_args) -> int:
    """0 without DeepSpeed, else the ZeRO stage of its config."""
    cfg = deepspeed_config(training_args)
    if cfg is None:
        return 0
    return int(cfg.get("zero_optimization", {}).get("stage", 0) or 0)


def using_deepspeed() -> bool:
    """True when launched for DeepSpeed (accelerate's env) or a `--deepspeed` config was given."""
    from transformers.integrations import is_deepspeed_available

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return True
    try:
        from transformers.integrations.deepspeed import deepspeed_config as hf_config

        return is_deepspeed_available() and hf_config() is not None
    except ImportError:  # pragma: no cover
        return False


def quant_storage_dtype(compute_dtype):
    """`bnb_4bit_quant_storage` for QLoRA: the compute dtype under ZeRO-3 (so 4-bit weights shard), else None.

    Transformers loads a 4-bit model under ZeRO-3 only when the packed weights have the same storage
    dtype as the rest of the model; ZeRO-2 and plain DDP need nothing.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    return compute_dtype if is_deepspeed_zero3_enabled() else None


def _init_deepspeed_comm_on_cpu() -> None:
    import torch

    if torch.cuda.is_available():
        return  # accelerate initialises DeepSpeed's comm itself on GPUs (nccl)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def setup_distributed(training_args) -> None:
    """Called by every stage before building its trainer (see stage.prepare_training). Idempotent."""
    extensions_dir()
    cfg = deepspeed_config(training_args)
    if cfg is None:
        return
    _init_deepspeed_comm_on_cpu()
    zero = cfg.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0) or 0) == 3 and not zero.get(GATHER_ON_SAVE):
        zero[GATHER_ON_SAVE] = True
        hf = getattr(training_args, "hf_deepspeed_config", None)
        if hf is not None and hf.config is not cfg:
            hf.config.setdefault("zero_optimization", {})[GATHER_ON_SAVE] = True
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[distributed] ZeRO-3: {GATHER_ON_SAVE} switched on, or the saved model/adapter would be empty",
                  flush=True)


def when_engine_built(evaluate_before):
    """Wrap stage.evaluate_before(trainer, ...): under DeepSpeed, before train() has built the engine,
    run it at on_train_begin instead and return its metrics dict, filled in place by then (the stages
    read these metrics only after training). Everywhere else it runs at once, unchanged."""
    import functools

    @functools.wraps(evaluate_before)
    def wrapper(trainer, *args, **kwargs):
        if not (getattr(trainer, "is_deepspeed_enabled", False) and getattr(trainer, "deepspeed", None) is None):
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
