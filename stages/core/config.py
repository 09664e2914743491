"""Recipe parsing: TRL's `TrlParser` semantics plus our typed argument groups.

A recipe YAML supplies defaults, command-line flags override them, an `env:` block is exported.
TRL's own dataclasses (`ScriptArguments`, the stage's `*Config`, `ModelConfig`) are parsed
unchanged, so a config written for `trl sft --config` runs here as is; our keys live in
`PolicyArguments`, `DataArguments` and `RunArguments`. Unknown keys are errors with a suggestion.
"""
from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

PEFT_METHODS = ("full", "lora", "dora", "qlora", "prefix", "prompt", "ia3", "adapters")
_METHOD_ALIASES = {"bottleneck": "adapters", "none": "full", "prefix_tuning": "prefix", "prompt_tuning": "prompt"}


def json_or_value(value, key: str = "value"):
    """CLI gives strings for dict/list keys: accept JSON there (`--eval_datasets '[]'` clears a list)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and value[0][:1] in "[{":
        value = value[0]
    if isinstance(value, str) and value.strip()[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: invalid JSON {value!r}: {e}") from None
    return value


@dataclass
class PolicyArguments:
    """How the policy is parameterised. LoRA/DoRA/QLoRA reuse TRL's `ModelConfig` keys (lora_r, lora_alpha, ...)."""

    peft_method: str | None = field(default=None, metadata={"help": f"One of {PEFT_METHODS}. Default: from TRL's use_peft/use_dora/load_in_4bit keys, else full."})
    qlora_bits: int = field(default=4, metadata={"help": "4 (NF4) or 8 bits for qlora."})
    num_virtual_tokens: int = field(default=16, metadata={"help": "Virtual tokens for prefix and prompt tuning."})
    prompt_tuning_init_text: str | None = field(default=None, metadata={"help": "Initialise prompt tuning from this text."})
    ia3_target_modules: list[str] | None = field(default=None, metadata={"help": "IA3 target modules (default: PEFT's per-architecture choice)."})
    adapter_size: int = field(default=64, metadata={"help": "Bottleneck adapter hidden size."})
    adapter_placement: str = field(default="both", metadata={"help": "Bottleneck adapters after: attn, mlp or both."})
    adapter_non_linearity: str = field(default="relu", metadata={"help": "Bottleneck adapter activation: relu, gelu, silu, tanh."})
    chat_template: str | None = field(default=None, metadata={"help": "Chat template (Jinja string or path to a .jinja file); default: the model's, else ChatML."})

    def __post_init__(self):
        if self.peft_method is not None:
            m = _METHOD_ALIASES.get(self.peft_method.lower(), self.peft_method.lower())
            if m not in PEFT_METHODS:
                raise ConfigError(f"peft_method: unknown method {self.peft_method!r}{_suggest(self.peft_method, PEFT_METHODS)}; choose one of {', '.join(PEFT_METHODS)}")
            self.peft_method = m
        if self.qlora_bits not in (4, 8):
            raise ConfigError(f"qlora_bits: must be 4 or 8, got {self.qlora_bits}")
        if self.num_virtual_tokens < 1:
            raise ConfigError("num_virtual_tokens: must be at least 1")
        if self.adapter_size < 1:
            raise ConfigError("adapter_size: must be at least 1")
        if self.adapter_placement not in ("attn", "mlp", "both"):
            raise ConfigError(f"adapter_placement: must be attn, mlp or both, got {self.adapter_placement!r}")

    def resolve_method(self, model_args) -> str:
        """Our `peft_method` wins; otherwise TRL's ModelConfig flags decide (a TRL CLI config runs unchanged)."""
        if self.peft_method:
            return self.peft_method
        if getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False):
            return "qlora"
        if getattr(model_args, "use_peft", False):
            return "dora" if getattr(model_args, "use_dora", False) else "lora"
        return "full"


@dataclass
class DataArguments:
    """Where the data comes from and how it is checked. `datasets` accepts TRL's mixture entries plus ours."""

    datasets: list[str] | None = field(default=None, metadata={"help": "Training sources: paths, Hub names, 'demo:NAME', or dicts (path, split, weight, fraction, format, column_mapping, ...)."})
    eval_datasets: list[str] | None = field(default=None, metadata={"help": "Validation sources; default: a deterministic split of the training data."})
    test_split_size: float | None = field(default=None, metadata={"help": "TRL's name for the validation share (same as validation_fraction)."})
    streaming: bool = field(default=False, metadata={"help": "TRL mixture key; streaming is not supported by this suite."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of training rows held out when no eval_datasets are given."})
    validation_size: int | None = field(default=None, metadata={"help": "Absolute number of held-out rows (overrides validation_fraction)."})
    data_format: str = field(default="auto", metadata={"help": "Row format: auto or a named format."})
    column_mapping: dict | str | None = field(default=None, metadata={"help": "Map canonical fields to your columns, e.g. {prompt: question}."})
    role_mapping: dict | str | None = field(default=None, metadata={"help": "Map your role names to system/user/assistant."})
    on_invalid: str = field(default="error", metadata={"help": "error (stop at the first bad row) or drop (drop and count)."})
    rating_scale: list[float] | None = field(default=None, metadata={"help": "Feedback ratings' [lowest, highest]; ratings outside it are invalid rows."})
    rating_threshold: float | None = field(default=None, metadata={"help": "KTO: rating >= this is desirable (default: the middle of rating_scale, else 0.5)."})
    pairs: str = field(default="all", metadata={"help": "DPO/RM from ratings: all (every two different ratings of a prompt) or extremes (best vs worst)."})
    on_long: str = field(default="truncate", metadata={"help": "Rows over max_length: truncate (keep the response, trim the prompt's start), drop (counted) or error."})
    loss_on: str = field(default="assistant", metadata={"help": "SFT loss on: assistant (all assistant turns), last (final turn only) or all tokens."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Cap on training rows after loading."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Cap on validation rows after loading."})
    tokenized_cache: bool = field(default=True, metadata={"help": "Reuse tokenised rows across stages and runs ($RLHF_SUITE_CACHE/tokenized)."})

    def __post_init__(self):
        self.datasets = json_or_value(self.datasets, "datasets")
        self.eval_datasets = json_or_value(self.eval_datasets, "eval_datasets")
        self.column_mapping = json_or_value(self.column_mapping, "column_mapping")
        self.role_mapping = json_or_value(self.role_mapping, "role_mapping")
        self.rating_scale = json_or_value(self.rating_scale, "rating_scale")
        from .ratings import check_rating_settings

        check_rating_settings(self.rating_scale, self.rating_threshold, self.pairs)
        if isinstance(self.datasets, (str, dict)):
            self.datasets = [self.datasets]
        if isinstance(self.eval_datasets, (str, dict)):
            self.eval_datasets = [self.eval_datasets]
        if self.test_split_size is not None:
            self.validation_fraction = float(self.test_split_size)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        for key, allowed in (("on_invalid", ("error", "drop")), ("on_long", ("truncate", "drop", "error")),
                             ("loss_on", ("assistant", "last", "all"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.streaming:
            raise ConfigError("streaming: streaming datasets are not supported; the suite validates and splits every row")


@dataclass
class RunArguments:
    """Stage behaviour that is ours, not TRL's: precision/threads policy, early stopping, outputs."""

    precision: str = field(default="auto", metadata={"help": "auto (bf16 where the hardware supports it), bf16, fp16 or fp32."})
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads per process (default: cores / local processes)."})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "Stop after this many evaluations without improvement; keeps the best checkpoint."})
    early_stopping_threshold: float = field(default=0.0, metadata={"help": "Minimum eval-loss improvement that counts."})
    compare_with_base: bool = field(default=True, metadata={"help": "Evaluate the starting model on the same validation split."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep intermediate checkpoints after the stage completes."})
    force: bool = field(default=False, metadata={"help": "Replace a completed output directory whose config differs."})
    license: str | None = field(default=None, metadata={"help": "License for the model card (e.g. apache-2.0)."})
    verbose: bool = field(default=False, metadata={"help": "Show every third-party warning, the known-harmless ones too (stages/core/noise.py)."})
    compact_lm_head: bool = field(default=True, metadata={"help": "CPU fast path: score only labelled positions in TRL's SFT/DPO LM head (false: TRL's own)."})
    bf16_frozen_weights: bool = field(default=True, metadata={"help": "CPU fast path: keep frozen base weights in bf16 under bf16 autocast (false: fp32)."})
    memory_budget_gb: float | None = field(default=None, metadata={"help": "CPU: GiB the activations kept for backward may take; layers beyond it are checkpointed (default: a quarter of the available memory, at most 0.5)."})
    micro_batches_for_memory: bool = field(default=True, metadata={"help": "CPU: a batch whose worst case would not fit memory_budget_gb trains as micro-batches with gradient accumulation (same rows and loss per step; less memory and padding)."})
    return_freed_memory: bool = field(default=False, metadata={"help": "CPU, memory over speed: glibc returns freed tensor memory to the system (a fixed 1 MiB mmap threshold) instead of keeping a fragmented heap. Real-length reward model: peak RSS 0.61x, step time 2.3x."})
    group_by_length: bool = field(default=True, metadata={"help": "Batch rows of similar length together (less padding; TRL's train_sampling_strategy=group_by_length). SFT only."})

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"precision: must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise ConfigError("memory_budget_gb: must be a positive number of GiB")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("num_threads: must be at least 1")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 0:
            raise ConfigError("early_stopping_patience: must be 0 (off) or more")


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class ParsedArgs:
    """Every argument group of a stage, plus which keys the user set explicitly (recipe or CLI)."""

    groups: dict[str, Any]
    explicit: set[str]
    config_path: str | None
    recipe: dict
    command: str = ""

    def __getattr__(self, name):
        try:
            return self.__dict__["groups"][name]
        except KeyError:
            raise AttributeError(name) from None


def load_recipe(path: str) -> dict:
    """Read a recipe YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of keys to values")
    return data


def parse_args(groups: dict[str, type], argv: list[str] | None = None, *, adjust=None) -> ParsedArgs:
    """Parse `--config recipe.yaml` plus CLI overrides into the named dataclass groups.

    `adjust(recipe_dict, explicit_keys)` may change recipe defaults before the dataclasses are built
    (used to pick precision/device so TrainingArguments' own checks pass on any hardware).
    """
    from trl import TrlParser

    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser(list(groups.values()))

    def _error(message):  # argparse would print the whole usage and exit; say the one thing instead
        named = re.match(r"argument --([\w-]+)", message)  # a value given on the command line is not the recipe's
        on_cli = named is not None and named.group(1).replace("-", "_") in cli_keys
        raise ConfigError(f"{'command line' if on_cli or not config_path else config_path}: {message}")

    parser.error = _error
    cli_keys: set[str] = set()
    known = {a.dest for a in parser._actions if a.dest != "help"}
    config_path, recipe = None, {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a path to a recipe YAML")
        config_path = argv[i + 1]
        recipe = load_recipe(config_path)
        del argv[i:i + 2]
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise ConfigError(f"{config_path}: env: must be a mapping of variable names to values")
    for key in recipe:
        if key not in known:
            raise ConfigError(f"{config_path}: unknown key '{key}'{_suggest(key, known)}")
    cli_keys.update(a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--"))
    for key in cli_keys:
        if key not in known:
            raise ConfigError(f"unknown command-line option '--{key}'{_suggest(key, known)}")
    explicit = set(recipe) | cli_keys
    if adjust is not None:  # adjust sees the command line's values too; the command line still wins at parsing
        view = {**recipe, **_cli_values(argv)}
        adjust(view, explicit)
        recipe.update({k: v for k, v in view.items() if k not in cli_keys})
    import os

    for k, v in env.items():
        os.environ[str(k)] = str(v)
    parser.set_defaults_with_config(**recipe)
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        on_cli = any(re.search(rf"\b{re.escape(k)}\b", str(e)) for k in cli_keys)
        raise ConfigError(f"{'command line' if on_cli or not config_path else config_path}: {e}") from None
    *objs, remaining = parsed
    if remaining:
        raise ConfigError(f"unexpected command-line arguments: {' '.join(remaining)}")
    import shlex

    original = list(sys.argv[1:] if argv_given is None else argv_given)
    script = sys.argv[0] if argv_given is None else "rlhf-stage"
    return ParsedArgs(groups=dict(zip(groups, objs)), explicit=explicit, config_path=config_path, recipe=recipe,
                      command=shlex.join([script, *original]))


def _cli_values(argv: list[str]) -> dict:
    """`--key value [value ...]` / `--key=value` pairs as YAML-typed values (for defaults that depend on them)."""
    import yaml

    out, key, vals = {}, None, []

    def close():
        if key is not None:
            try:
                typed = [yaml.safe_load(v) for v in vals]
            except yaml.YAMLError:
                typed = list(vals)
            out[key] = True if not typed else typed[0] if len(typed) == 1 else typed

    for a in argv:
        if a.startswith("--"):
            close()
            name, eq, value = a[2:].partition("=")
            key, vals = name.replace("-", "_"), [value] if eq else []
        elif key is not None:
            vals.append(a)
    close()
    return out


def to_plain(obj) -> dict:
    """A JSON-safe dict of a dataclass, with secrets removed (for manifests and logs)."""
    out = {}
    for f in fields(obj):
        if any(s in f.name.lower() for s in ("token", "secret", "password", "api_key")) and f.name not in (
            "pad_token", "eos_token", "num_virtual_tokens", "max_new_tokens"):
            continue
        v = getattr(obj, f.name)
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[f.name] = v
    return out
