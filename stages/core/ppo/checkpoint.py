"""PPO checkpoints: `checkpoint-<update>/` under the stage's work dir, written atomically, rotated.

Contents: the trainable weights only (policy/value adapters + value head in PEFT mode; policy, value
model and head in full mode) as safetensors, optimizer and scheduler states, per-process RNG states,
and trainer_state.json (update counter, KL coefficient, metric history, config fingerprint).
Under DeepSpeed the engine's own sharded checkpoint (accelerator.save_state) replaces the weights
and optimizer files.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save(trainer, directory: Path, limit: int | None = None, *, name: str | None = None) -> Path:
    """Write checkpoint-<update> (or `name`, never rotated) for `trainer` (a PPOTrainer) and drop the oldest beyond `limit`."""
    acc = trainer.accelerator
    final = Path(directory) / (name or f"checkpoint-{trainer.update}")
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if _is_deepspeed(acc):
        acc.save_state(str(tmp))
    elif acc.is_main_process:
        from safetensors.torch import save_file

        weights = {n: p.detach().to("cpu", copy=True).contiguous()
                   for n, p in trainer.actor_critic.named_parameters() if p.requires_grad}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
    if acc.is_main_process:
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE).write_text(json.dumps(trainer.state_dict(), indent=1, default=str))
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        rotate(directory, limit)
    acc.wait_for_everyone()
    return final


def rotate(directory: Path, limit: int | None) -> None:
    if not limit or limit < 1:
        return
    found = sorted((int(m.group(1)), p) for p in Path(directory).iterdir() if (m := _NAME.match(p.name)))
    for _, p in found[:-limit]:
        shutil.rmtree(p, ignore_errors=True)


def load(trainer, path: str | Path) -> dict:
    """Restore a checkpoint into `trainer`; returns the trainer state (history, update, ...)."""
    acc, path = trainer.accelerator, Path(path)
    state = json.loads((path / STATE).read_text())
    if _is_deepspeed(acc):
        acc.load_state(str(path))
    else:
        from safetensors.torch import load_file

        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(trainer.actor_critic.named_parameters())
        unknown = sorted(set(weights) - set(params))
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
        if unknown or missing:  # a partial load would silently resume half-trained weights
            what = f"unknown {unknown[0]}" if unknown else f"missing {missing[0]}"
            raise RuntimeError(f"{path}: checkpoint weights do not match the model ({what}); "
                               "was the config changed since this checkpoint was written?")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    rng = path / f"rng_{acc.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    return state
