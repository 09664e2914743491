"""A PPO policy's weights for the stage output (the rest of the artifact is lifecycle.StageRun.save).

PEFT mode writes only the "policy" adapter, as a standard adapter directory (adapter_config.json +
adapter_model.safetensors) whose base_model_name_or_path is the model PPO started from, so
stages/core/policy.load_model merges it (through any SFT adapter beneath it) like every other stage output.
"""
from __future__ import annotations

import copy
from pathlib import Path



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
