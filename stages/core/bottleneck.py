"""Bottleneck (Houlsby / Pfeiffer) adapters as a PEFT method.

Each targeted sub-module (by default the attention and/or MLP block of every decoder layer) is wrapped so that its
output ``h`` becomes ``h + scaling * up(dropout(act(down(h))))``. The up-projection is zero-initialised, so a fresh
adapter is an exact identity. For tuple outputs (attention returns ``(hidden, weights)``) only the first element is
adapted. Several active adapters are applied one after another (stacked). Adapters are non-linear and cannot be merged.

Registration (why this way): PEFT 0.21's ``register_peft_method`` refuses any name missing from the closed
``peft.utils.PeftType`` enum, and Python enums cannot be extended without poking at private enum internals. Every
lookup PEFT makes, however, goes through the ``PEFT_TYPE_TO_{CONFIG,TUNER,PREFIX}_MAPPING`` dicts keyed by the
``peft_type`` value, and ``PeftConfig.peft_type`` is typed ``Union[str, PeftType]`` (PEFT fixed its handling of
custom types in huggingface/peft#2634). So :func:`register` fills those dicts (with the uniqueness checks that
``register_peft_method`` performs) for our own ``str`` enum member ``BOTTLENECK``; a ``str`` enum hashes and compares
like its value, so the ``"BOTTLENECK"`` read back from ``adapter_config.json`` finds the same entries. Result:
``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``/``load_adapter``, ``disable_adapter`` and TRL
trainers work unchanged, with no patching of PEFT.
The registry lives in the process, so ``stages.core.bottleneck`` must be imported before loading a saved adapter;
otherwise PEFT fails with ``KeyError: 'BOTTLENECK'``.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckModel", "BottleneckPeftType", "register",
           "default_target_modules"]

PREFIX = "bottleneck_"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = ("attn", "mlp", "both")
# Sub-module names of a decoder layer (Llama/Qwen2/Mistral: self_attn, mlp; GPT-2: attn, mlp; others best effort).
_LAYER_LISTS = r"(?:layers|h|blocks|layer)"
_ATTN = ("self_attn", "attn", "self_attention", "attention")
_MLP = ("mlp", "feed_forward", "ffn")


class BottleneckPeftType(str, enum.Enum):
    """Our PEFT type. Name must equal value: a str-enum hashes by name and compares by value."""

    BOTTLENECK = "BOTTLENECK"


def default_target_modules(placement: str = "both") -> str:
    """Regex (PEFT full-match) for the attention and/or MLP block of each numbered decoder layer."""
    names = {"attn": _ATTN, "mlp": _MLP, "both": _ATTN + _MLP}[placement]
    return rf".*\.{_LAYER_LISTS}\.\d+\.(?:{'|'.join(names)})"


@dataclass
class BottleneckConfig(PeftConfig):
    """Config of a bottleneck adapter. ``target_modules=None`` selects the blocks named by ``placement``."""

    bottleneck_size: int = field(default=64, metadata={"help": "Inner width of the adapter."})
    reduction_factor: Optional[float] = field(
        default=None, metadata={"help": "If set, overrides bottleneck_size with hidden_size // reduction_factor."})
    placement: str = field(default="both", metadata={"help": "'attn' (after attention), 'mlp' (Pfeiffer) or 'both' "
                                                             "(Houlsby)."})
    non_linearity: str = field(default="relu", metadata={"help": "relu | gelu | silu | tanh"})
    dropout: float = field(default=0.0, metadata={"help": "Dropout inside the adapter."})
    scaling: float = field(default=1.0, metadata={"help": "Multiplier on the adapter output."})
    init_weights: bool = field(default=True, metadata={"help": "Zero-init the up-projection (identity at start)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules whose output is adapted (names or a full-match regex)."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained fully and saved (e.g. lm_head)."})
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = BottleneckPeftType.BOTTLENECK
        if self.reduction_factor is None:
            if isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) \
                    or self.bottleneck_size < 1:
                raise ValueError(f"bottleneck_size must be a positive int, got {self.bottleneck_size!r}")
        elif not isinstance(self.reduction_factor, (int, float)) or not self.reduction_factor > 0:
            raise ValueError(f"reduction_factor must be a number > 0, got {self.reduction_factor!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {tuple(ACTIVATIONS)}, got {self.non_linearity!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)

    def size_for(self, hidden_size: int) -> int:
        """The adapter width for a given hidden size."""
        if self.reduction_factor is None:
            return self.bottleneck_size
        return max(1, int(hidden_size // self.reduction_factor))


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """Wraps any module and adds the active bottleneck adapter(s) to its (first) output."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act", "bottleneck_dropout", "bottleneck_scaling")

    def __init__(self, base_layer: nn.Module, adapter_name: str, hidden_size: int, config: BottleneckConfig):
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.bottleneck_down, self.bottleneck_up = nn.ModuleDict(), nn.ModuleDict()
        self.bottleneck_act, self.bottleneck_dropout = nn.ModuleDict(), nn.ModuleDict()
        self.bottleneck_scaling: dict[str, float] = {}
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        ref = next((p for p in self.base_layer.parameters() if p.is_floating_point()), None)
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        size = config.size_for(self.hidden_size)
        down, up = nn.Linear(self.hidden_size, size, **kw), nn.Linear(size, self.hidden_size, **kw)
        nn.init.zeros_(down.bias)
        if config.init_weights:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name], self.bottleneck_up[adapter_name] = down, up
        self.bottleneck_act[adapter_name] = ACTIVATIONS[config.non_linearity]()
        self.bottleneck_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.bottleneck_scaling[adapter_name] = float(config.scaling)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError("Bottleneck adapters are non-linear and cannot be merged into the base weights; keep the "
                         "PeftModel, or use `unload()` to drop them.")

    def unmerge(self) -> None:  # nothing is ever merged
        pass

    def _adapt(self, name: str, h: torch.Tensor) -> torch.Tensor:
        down = self.bottleneck_down[name]
        x = self._cast_input_dtype(h, down.weight.dtype)
        y = self.bottleneck_up[name](self.bottleneck_dropout[name](self.bottleneck_act[name](down(x))))
        return h + (y * self.bottleneck_scaling[name]).to(h.dtype)

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        active = [a for a in self.active_adapters if a in self.bottleneck_down]
        if self.disable_adapters or not active:
            return out
        h = out[0] if isinstance(out, tuple) else out
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"bottleneck adapter: cannot adapt output of type {type(h).__name__} of "
                            f"{type(self.base_layer).__name__}")
        for name in active:
            h = self._adapt(name, h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # e.g. layer_idx, is_causal of the wrapped attention

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """PEFT tuner that inserts :class:`BottleneckLayer` wrappers. Use via ``peft.get_peft_model``."""

    prefix: str = PREFIX
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict[str, list[str]] = {}  # resolved structurally, see default_target_modules

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(peft_config.placement)
        return peft_config

    def _hidden_size(self, target: nn.Module) -> int:
        cfg = self.get_model_config(self.model)
        for c in (cfg, cfg.get("text_config") or {}):
            for key in ("hidden_size", "n_embd", "d_model"):
                if isinstance(c.get(key), int):
                    return c[key]
        last = [m for m in target.modules() if isinstance(getattr(m, "out_features", getattr(m, "nf", None)), int)]
        if last:
            return getattr(last[-1], "out_features", getattr(last[-1], "nf", None))
        raise ValueError(f"bottleneck adapter: cannot determine the hidden size for {type(target).__name__}; the "
                         "model config has no hidden_size/n_embd/d_model")

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLayer(target, adapter_name, self._hidden_size(target), peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(new_module, BottleneckLayer):
            super()._replace_module(parent, child_name, new_module, child)
        else:  # unloading: put the wrapped module back untouched (it has no `.weight` to re-attach)
            setattr(parent, child_name, new_module)

    def _check_merge_allowed(self):
        raise ValueError("Bottleneck adapters are non-linear and cannot be merged into the base weights; keep the "
                         "PeftModel, or use `unload()` to drop them.")


def register() -> None:
    """Make the BOTTLENECK type known to PEFT (idempotent; called at import)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    key = BottleneckPeftType.BOTTLENECK
    current = PEFT_TYPE_TO_TUNER_MAPPING.get(key)
    if current is not None and (current.__module__, current.__qualname__) != (__name__, "BottleneckModel"):
        raise KeyError(f"PEFT already has a method called {key.value!r} ({current!r}); cannot register ours.")
    owner = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == PREFIX and t != key]
    if owner:
        raise KeyError(f"PEFT prefix {PREFIX!r} is already used by {owner[0]!r}.")
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = BottleneckConfig
    PEFT_TYPE_TO_TUNER_MAPPING[key] = BottleneckModel
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX


register()
