"""Finalising a PPO output without an HF Trainer: the policy (adapter or full model), tokenizer, metrics,
curves, model card and manifest, assembled in staging and swapped into place (artifacts.StageOutput.finalize).

PEFT mode writes only the "policy" adapter, as a standard adapter directory (adapter_config.json +
adapter_model.safetensors) whose base_model_name_or_path is the model PPO started from, so
stages/core/policy.load_model merges it (through any SFT adapter beneath it) like every other stage output.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .. import artifacts
from ..stage import log


def _gathered_state(trainer):
    """Under DeepSpeed every process takes part in gathering the (possibly sharded) weights."""
    if getattr(trainer.accelerator.state, "deepspeed_plugin", None) is None:
        return None
    sd = trainer.accelerator.get_state_dict(trainer.model)
    return {k[3:]: v for k, v in (sd or {}).items() if k.startswith("lm.")}


def save_policy(trainer, policy, directory: Path) -> None:
    ac, state = trainer.actor_critic, _gathered_state(trainer)
    if not trainer.accelerator.is_main_process:
        return
    if trainer.roles.mode == "peft":
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        sd = get_peft_model_state_dict(ac.lm, state_dict=state, adapter_name="policy")
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(directory / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        cfg = copy.deepcopy(ac.lm.peft_config["policy"])
        src = policy.source
        cfg.base_model_name_or_path = str(Path(src).resolve()) if Path(src).exists() else src
        cfg.inference_mode = True
        cfg.save_pretrained(str(directory))
    else:
        lm = ac.lm
        lm.config.use_cache = True
        lm.save_pretrained(str(directory), state_dict=state, safe_serialization=True)


def save_ppo_artifact(trainer, policy, out, manifest: dict, stage: str, keep_checkpoints: bool):
    acc = trainer.accelerator
    acc.wait_for_everyone()
    save_policy(trainer, policy, out.staging)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    policy.tokenizer.save_pretrained(str(out.staging))
    history = trainer.history
    artifacts.write_json(out.staging / "metrics.json", {**manifest.get("metrics", {}), "log_history": history})
    try:
        from ..plots import plot_curves

        plot_curves(history, out.staging / "curves.png", title=f"{stage}: {Path(out.output_dir).name}")
    except Exception as e:  # a plot must never cost the artifact
        log(stage, f"could not draw curves.png: {e}")
    try:
        from ..modelcard import write_model_card

        write_model_card(out.staging, manifest)
    except Exception as e:  # a model card must never cost the artifact
        log(stage, f"could not write the model card: {e}")
    final = out.finalize(json.loads(json.dumps(manifest, default=str)), keep_checkpoints=keep_checkpoints)
    log(stage, f"wrote {final}")
    return final
