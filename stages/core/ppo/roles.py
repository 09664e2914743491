"""The four PPO roles (policy, value, reference, reward) in two memory modes.

PEFT mode ("one base, four roles"): ONE frozen base model carries a "policy" adapter, a "value"
adapter (+ a small value head), and a "reward" adapter + score head when the reward model is a LoRA
trained on the same base; the reference is the base with adapters disabled, which is the SFT policy
because a LoRA SFT output is merged on load (stages/core/policy.py). Roles are switched by setting
the adapter layers' active adapter directly: PEFT's own set_adapter/disable_adapter also flip
requires_grad, which would corrupt a step that trains two adapters. PEFT's saved-module copies
(`modules_to_save`, e.g. a trained lm_head; AuxiliaryTrainingWrapper) are switched the same way: the
"policy" copy for the policy, the original (= SFT) module for the reference, and for a role without a
copy of its own (value, reward) the original module, so the value loss never trains the policy's copy.
Full mode: separate models: trainable policy and value model, frozen reference copy, frozen reward model.

`ActorCritic` is the one trained nn.Module (what accelerate wraps for DDP/DeepSpeed): forward returns
the policy's response logits and the value model's per-token values in a single call.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError, ModelError
from . import shared_reward as SR


def _backbone(model):
    """The transformer body of a causal-LM or sequence-classification model (LlamaModel, GPT2Model, ...)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def _hidden_size(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return cfg.hidden_size


def new_value_head(hidden: int) -> nn.Linear:
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)  # V = 0 at the start; the head learns first, the value adapter follows
    nn.init.zeros_(head.bias)
    return head


class ActorCritic(nn.Module):
    """Policy + value. `shared`: one PeftModel with "policy"/"value"(/"reward") adapters; else lm and critic are separate."""

    def __init__(self, lm, value_head: nn.Linear, critic=None, shared: bool = False):
        super().__init__()
        self.lm, self.value_head, self.critic, self.shared = lm, value_head, critic, shared
        if shared:
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            self._tuners = [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]
            # modules_to_save / trainable-token copies: a wrapper runs its original module when its adapters
            # are disabled or the active adapter has no copy there (AuxiliaryTrainingWrapper.forward)
            self._wrappers = [m for m in lm.modules() if isinstance(m, AuxiliaryTrainingWrapper)]

    @property
    def config(self):
        """The policy's config (accelerate sizes DeepSpeed's "auto" buckets from its hidden size)."""
        return self.lm.config

    # -- roles (PEFT mode) -----------------------------------------------------------------------
    def _state(self):
        t = self._tuners[0]
        return t._active_adapter, t._disable_adapters

    def _set(self, active, disabled) -> None:
        for t in self._tuners:
            t._active_adapter, t._disable_adapters = active, disabled
        names = [active] if isinstance(active, str) else list(active)
        for w in self._wrappers:
            w._active_adapter, w._disable_adapters = names, disabled

    @contextlib.contextmanager
    def use(self, role: str):
        """Activate "policy", "value", "reward" or "reference" (= adapters disabled); no-op in full mode."""
        if not self.shared:
            yield
            return
        prev = self._state()
        self._set(prev[0] if role == "reference" else role, role == "reference")
        try:
            yield
        finally:
            self._set(*prev)

    def checkpoint_contexts(self):
        """torch.utils.checkpoint context_fn: recompute under the role that was active in the forward."""
        state = self._state()

        @contextlib.contextmanager
        def recompute():
            prev = self._state()
            self._set(*state)
            try:
                yield
            finally:
                self._set(*prev)

        return contextlib.nullcontext(), recompute()

    def enable_checkpointing(self) -> None:
        kwargs = {"use_reentrant": False}
        if self.shared:
            kwargs["context_fn"] = self.checkpoint_contexts
        for m in {id(m): m for m in (self.lm.get_base_model() if self.shared else self.lm, self.critic) if m is not None}.values():
            enable = getattr(m, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs=kwargs)
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # -- forward passes ----------------------------------------------------------------------------
    def policy_logits(self, input_ids, attention_mask, position_ids, n_response: int, role: str = "policy"):
        """Logits predicting the last n_response tokens, (B, n_response, V)."""
        with self.use(role):
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=n_response + 1, use_cache=False)
        return out.logits[:, :-1]

    def values(self, input_ids, attention_mask, position_ids, n_response: int):
        """V(s_t) for the states before each of the last n_response tokens, (B, n_response), float32."""
        body = _backbone(self.lm) if self.shared else self.critic
        with self.use("value"):
            h = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
        h = h[:, -n_response - 1:-1]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids, attention_mask, position_ids, n_response: int):
        logits = self.policy_logits(input_ids, attention_mask, position_ids, n_response)
        return logits, self.values(input_ids, attention_mask, position_ids, n_response)


@dataclass
class Roles:
    actor_critic: ActorCritic
    reward_model: object | None  # a RewardModel (shared or separate), None for rule-only rewards
    reference: nn.Module | None  # full mode only; PEFT mode: adapters disabled
    mode: str  # "peft" or "full"
    value_init: str  # "reward" or "policy"
    info: dict = field(default_factory=dict)

    def reference_logits(self, input_ids, attention_mask, position_ids, n_response: int):
        if self.reference is None:
            return self.actor_critic.policy_logits(input_ids, attention_mask, position_ids, n_response, role="reference")
        out = self.reference(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             logits_to_keep=n_response + 1, use_cache=False)
        return out.logits[:, :-1]


def _set_trainable(ac: ActorCritic, adapters=("policy", "value")) -> None:
    for name, p in ac.named_parameters():
        if name.startswith("value_head."):
            p.requires_grad_(True)
        elif ac.shared:
            p.requires_grad_(any(a in name.split(".") for a in adapters))


# -- builders --------------------------------------------------------------------------------------
def build_roles(policy, cfg, *, device, load_reward) -> Roles:
    """policy: stages.core.policy.Policy; load_reward(path) -> RewardModel (separate, frozen)."""
    if policy.peft_config is not None:
        return _build_peft(policy, cfg, device, load_reward)
    if hasattr(policy.model, "peft_config"):
        raise ConfigError(f"peft_method: PPO trains full models or LoRA/DoRA/QLoRA/IA3 adapters; {policy.source} holds a "
                          f"{policy.method} adapter that cannot be merged")
    return _build_full(policy, cfg, device, load_reward)


def _value_init(cfg, reward_available: bool, where: str) -> str:
    if cfg.value_model == "auto":
        return "reward" if reward_available else "policy"
    if cfg.value_model == "reward" and not reward_available:
        raise ConfigError(f"value_model: reward needs {where}")
    return cfg.value_model


def _build_peft(policy, cfg, device, load_reward) -> Roles:
    from peft import get_peft_model

    if policy.method not in ("lora", "dora", "qlora", "ia3"):
        raise ConfigError(f"peft_method: PPO's one-base mode supports lora, dora, qlora and ia3, not {policy.method}")
    lm = get_peft_model(policy.model, policy.peft_config, adapter_name="policy")
    rm_cfg = SR.shareable_reward_adapter(cfg.reward_model, policy)
    if rm_cfg is not None and policy.method == "ia3":  # PEFT cannot mix IA3 and LoRA adapters on one model
        print("[ppo] the reward model is a LoRA and the policy IA3: PEFT cannot mix adapter types on one base, so "
              "the reward model is loaded as a separate model", flush=True)
        rm_cfg = None
    value = _value_init(cfg, rm_cfg is not None, "a reward model that is a LoRA on the policy's base in PEFT mode "
                                                  "(or peft_method: full)")
    reward_head = None
    if rm_cfg is not None:
        reward_head = SR.load_adapter_weights(lm, cfg.reward_model, "reward")
    if value == "reward":
        head = SR.load_adapter_weights(lm, cfg.reward_model, "value")
    else:
        lm.add_adapter("value", _value_adapter_config(policy.peft_config, lm))
        head = new_value_head(_hidden_size(lm))
    ac = ActorCritic(lm, head, shared=True)
    _set_trainable(ac)
    ac.to(device)
    reward_model = None
    if rm_cfg is not None:
        from reward.model import RewardModel

        tok = SR.reward_tokenizer(cfg.reward_model, policy.tokenizer)
        reward_model = RewardModel(SR.SharedRewardModel(ac, reward_head), tok, device, batch_size=cfg.reward_batch_size)
    elif cfg.reward_model:
        reward_model = load_reward(cfg.reward_model)
    info = {"reward": "adapter on the shared base" if rm_cfg else ("separate model" if cfg.reward_model else "rules only"),
            "reference": "adapters disabled (the starting policy)", "value": f"adapter + head, from the {value}"}
    return Roles(ac, reward_model, None, "peft", value, info)


def _value_adapter_config(policy_cfg, lm):
    """The policy's adapter config without the output layer: the value model never runs the LM head
    (an adapter part that never gets a gradient would also break DDP's reducer)."""
    cfg = copy.deepcopy(policy_cfg)
    cfg.modules_to_save = None
    out = lm.get_output_embeddings()
    head = next((n.rsplit(".", 1)[-1] for n, m in lm.get_base_model().named_modules() if m is out), "lm_head")
    targets = cfg.target_modules
    if isinstance(targets, (list, set, tuple)) and head in targets:
        cfg.target_modules = [t for t in targets if t != head]
    return cfg


def _build_full(policy, cfg, device, load_reward) -> Roles:
    reward_model = load_reward(cfg.reward_model) if cfg.reward_model else None
    # the value model reads the policy's token ids: a reward model with another vocabulary cannot be its start
    same_vocab = reward_model is not None and reward_model.tokenizer.get_vocab() == policy.tokenizer.get_vocab()
    value = _value_init(cfg, same_vocab, "a reward_model with the policy's tokenizer")
    lm = policy.model
    reference = copy.deepcopy(lm).requires_grad_(False).eval().to(device)
    if value == "reward":
        rm = reward_model.model.get_base_model() if hasattr(reward_model.model, "get_base_model") else reward_model.model
        critic = copy.deepcopy(_backbone(rm)).float()
        head = reward_model._head
        if head is None:
            raise ModelError(f"{cfg.reward_model}: no score head found to initialise the value model from")
        head = SR.head_copy(head.weight.detach().cpu(), None if head.bias is None else head.bias.detach().cpu())
    else:
        critic = copy.deepcopy(_backbone(lm))
        head = new_value_head(_hidden_size(lm))
    critic.requires_grad_(True)
    ac = ActorCritic(lm, head, critic=critic, shared=False).to(device)
    _set_trainable(ac)
    info = {"reward": "separate model" if reward_model else "rules only", "reference": "separate frozen copy",
            "value": f"separate model + head, from the {value}"}
    return Roles(ac, reward_model, reference, "full", value, info)
