"""The reward model as a LoRA adapter + score head on the policy's own base (PEFT mode, no second model).

Used when the reward-model stage output is a LoRA (SEQ_CLS) trained on exactly the model PPO starts from:
its LoRA weights become a frozen "reward" adapter on the shared base, its score head a small frozen linear
layer, and reward.model.RewardModel scores text with it, so rendering and truncation are the RM stage's.
Like reward.model.load_reward_model, loading fails loudly when the head is missing.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError


def _backbone(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def head_copy(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    head = nn.Linear(weight.shape[1], 1, bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())
    return head


def shareable_reward_adapter(reward_model: str | None, policy) -> dict | None:
    """The RM's adapter config when it is a LoRA (SEQ_CLS) trained on exactly the policy's starting model."""
    from ..policy import adapter_config

    if not reward_model or not Path(reward_model).is_dir():
        return None
    acfg = adapter_config(reward_model)
    if not acfg or str(acfg.get("peft_type", "")).upper() != "LORA" or str(acfg.get("task_type", "")).upper() != "SEQ_CLS":
        return None
    base = acfg.get("base_model_name_or_path") or ""
    same = Path(base).exists() and Path(policy.source).exists() and Path(base).resolve() == Path(policy.source).resolve()
    return acfg if same or base == policy.source else None


def load_adapter_weights(lm, path: str, name: str) -> nn.Linear:
    """Add the RM's LoRA as adapter `name` on the shared base; return its score head (fails loudly if absent)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    from reward.model import _is_head_key

    f = Path(path) / "adapter_model.safetensors"
    if not f.is_file():
        raise ModelError(f"{path}: adapter_config.json but no adapter_model.safetensors")
    sd = load_file(str(f))
    head = {k: v for k, v in sd.items() if _is_head_key(k)}
    weight = next((v for k, v in head.items() if k.endswith("weight")), None)
    if weight is None or weight.shape[0] != 1:
        raise ModelError(f"{path}: no reward head weights (score/classifier, 1 output) in the adapter; loading it would "
                         "leave the head newly initialised. Retrain the reward model with modules_to_save=['score']")
    bias = next((v for k, v in head.items() if k.endswith("bias")), None)
    cfg = LoraConfig.from_pretrained(path)
    cfg.task_type, cfg.modules_to_save, cfg.inference_mode = "CAUSAL_LM", None, False
    lm.add_adapter(name, cfg)
    lora = {k: v for k, v in sd.items() if k not in head}
    result = set_peft_model_state_dict(lm, lora, adapter_name=name)
    missing = [k for k in result.unexpected_keys]
    if missing:
        raise ModelError(f"{path}: {len(missing)} reward adapter weights did not fit the policy's base (e.g. {missing[0]})")
    return head_copy(weight, bias)


def reward_tokenizer(path: str, fallback):
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return fallback
    return tok if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id else fallback


class SharedRewardModel(nn.Module):
    """The reward adapter + score head on the shared base, shaped like a sequence-classification model
    so reward.model.RewardModel scores text with it (same rendering and truncation as the RM stage)."""

    def __init__(self, actor_critic, head: nn.Linear):
        super().__init__()
        self.score = head.requires_grad_(False)
        self.__dict__["_ac"] = actor_critic  # not a submodule: RewardModel's .eval()/.to() must not touch the policy

    @property
    def config(self):
        return self._ac.lm.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        lm, was_training = self._ac.lm, self._ac.lm.training
        lm.eval()  # no adapter dropout in a score
        try:
            with self._ac.use("reward"):
                h = _backbone(lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
        finally:
            lm.train(was_training)
        logits = self.score(h.to(self.score.weight.dtype))
        return type("Out", (), {"logits": logits[:, -1]})()
