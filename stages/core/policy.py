"""One policy builder for every stage: load the starting model, then parameterise it.

Methods: full, lora, dora, qlora (4-bit NF4 or 8-bit + LoRA), prefix, prompt, ia3, adapters (bottleneck).

Convention for starting from an earlier stage's output (the "reference" rule every stage shares):
a *mergeable* adapter (LoRA, DoRA, IA3) is merged into its base when loaded, so the loaded model IS
the earlier policy, and a new adapter on top of it has "adapters disabled" == the earlier policy;
DPO's and PPO's reference is then the SFT policy with no second copy of the model. Adapters that
cannot be merged (prefix, prompt, bottleneck) are loaded trainable and trained further; TRL's
preference trainers then keep a frozen copy of them as the reference adapter.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed, models, runtime  # distributed: see load_model below
from .errors import ConfigError, ModelError

MERGEABLE = {"LORA", "IA3"}
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    method: str
    peft_config: object | None
    source: str  # what was loaded (path or Hub id)
    base_model: str  # the original base model's name (through any merged adapters)
    merged_adapter: str | None = None  # adapter dir merged into the base, if any
    adapter_base: str | None = None  # what this stage's saved adapter applies to (default: source)
    info: dict = field(default_factory=dict)


def adapter_config(path: str) -> dict | None:
    p = Path(path) / "adapter_config.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM


def quantization_config(method: str, policy_args, model_args, compute_dtype):
    if method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    if policy_args.qlora_bits == 8 or getattr(model_args, "load_in_8bit", False):
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=getattr(model_args, "bnb_4bit_quant_type", "nf4") or "nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(name_or_path: str, *, task: str = "causal_lm", num_labels: int = 1, dtype=torch.float32,
               quantization=None, trust_remote_code: bool = False, revision: str | None = None,
               attn_implementation: str | None = None):
    """Load a model, merging a mergeable adapter output into its base. Returns (model, base_name, merged_dir)."""
    acfg = adapter_config(name_or_path)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, revision=revision)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if task == "seq_cls":
        kwargs["num_labels"] = num_labels
    cls = _model_class(task)
    if acfg is None:
        path = models.resolve_model(name_or_path, revision=revision)
        try:
            model = cls.from_pretrained(path, quantization_config=quantization, **kwargs)
        except OSError as e:
            raise ModelError(f"could not load model '{name_or_path}': {e}") from None
        return model, name_or_path, None
    # An adapter output of an earlier stage: rebuild base + adapter.
    base_name = acfg.get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"{name_or_path}/adapter_config.json: no base_model_name_or_path")
    peft_type = str(acfg.get("peft_type", "")).upper()
    if peft_type not in MERGEABLE:
        raise ModelError(
            f"{name_or_path}: a {peft_type} adapter cannot be merged; use load_adapter_policy() to train it further")
    from peft import PeftModel

    base, origin, _ = load_model(base_name, task=task, num_labels=num_labels, dtype=dtype,
                                 trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    _match_vocab(base, name_or_path)
    from peft import PeftConfig

    pcfg = PeftConfig.from_pretrained(name_or_path)
    if pcfg.task_type and pcfg.task_type != TASK_TYPES[task]:  # e.g. an SFT (causal-LM) LoRA under a reward model
        pcfg.task_type = None
    merged = PeftModel.from_pretrained(base, name_or_path, config=pcfg).merge_and_unload()
    merged.requires_grad_(True)  # PEFT froze the base while loading the adapter; the merged model is a plain model
    if quantization is not None:  # quantize the merged weights: never merge into 4-bit weights
        cache = models.cache_dir() / "merged" / _merged_key(name_or_path, task, num_labels)
        if not (cache / "config.json").is_file() and distributed_main():
            import shutil
            import tempfile

            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
            try:
                merged.save_pretrained(tmp, safe_serialization=True)
                if not cache.exists():
                    os.replace(tmp, cache)  # written once: a lost race keeps the winner's (identical) copy
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _wait_for(cache / "config.json")
        merged = cls.from_pretrained(str(cache), quantization_config=quantization, **kwargs)
    return merged, origin, str(Path(name_or_path).resolve())


load_model = distributed.zero3_loading(load_model)  # ZeRO-3: comm first, adapters merged whole (distributed.py)


def _match_vocab(model, adapter_dir: str) -> None:
    """An adapter saved after the tokenizer gained a pad token expects the resized embedding."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(adapter_dir)
    except Exception:
        return
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))


def _merged_key(path: str, task: str, num_labels: int) -> str:
    """The merged-base cache key: the model task (a reward model's merge is not a causal LM's), the adapter's
    content and its base's content key."""
    from .artifacts import fingerprint
    from .fingerprints import dir_content_key, model_key

    base = adapter_config(path).get("base_model_name_or_path")
    return fingerprint({"task": task, "num_labels": num_labels if task == "seq_cls" else None,
                        "adapter": dir_content_key(Path(path)), "base": model_key(base)})


def distributed_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _wait_for(path: Path, timeout: float = 1800) -> None:
    """Other ranks wait for the main process's cache entry instead of writing their own."""
    import time

    deadline = time.time() + timeout
    while not path.is_file():
        if time.time() > deadline:
            raise ModelError(f"timed out waiting for {path} (written by the main process)")
        time.sleep(1)


def frozen_reference(model):
    """A frozen copy of the model as loaded: the reference for full-parameter preference/RL training."""
    import copy

    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def default_lora_targets(model) -> str | list[str]:
    return "all-linear"


def peft_config_for(method: str, model_args, policy_args, *, task: str = "causal_lm", model=None):
    """The PEFT config for a method (None for full fine-tuning)."""
    task_type = TASK_TYPES[task]
    if method == "full":
        return None
    if method in ("lora", "dora", "qlora"):
        from peft import LoraConfig

        targets = model_args.lora_target_modules or "all-linear"
        if isinstance(targets, list) and len(targets) == 1 and targets[0] == "all-linear":
            targets = "all-linear"
        return LoraConfig(
            r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
            target_modules=targets, modules_to_save=model_args.lora_modules_to_save,
            use_rslora=model_args.use_rslora, use_dora=(method == "dora") or bool(model_args.use_dora),
            task_type=task_type,
        )
    if method == "prefix":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=policy_args.num_virtual_tokens, task_type=task_type)
    if method == "prompt":
        from peft import PromptTuningConfig, PromptTuningInit

        kw = {}
        if policy_args.prompt_tuning_init_text:
            kw = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=policy_args.prompt_tuning_init_text,
                      tokenizer_name_or_path=getattr(model, "name_or_path", None))
        return PromptTuningConfig(num_virtual_tokens=policy_args.num_virtual_tokens, task_type=task_type, **kw)
    if method == "ia3":
        from peft import IA3Config

        kw = {}
        if policy_args.ia3_target_modules:
            # IA3 scales inputs of feed-forward targets; treat every target not in attention as feed-forward.
            ff = [m for m in policy_args.ia3_target_modules if any(k in m for k in ("mlp", "fc", "down", "up", "gate"))]
            kw = dict(target_modules=policy_args.ia3_target_modules, feedforward_modules=ff)
        return IA3Config(task_type=task_type, **kw)
    if method == "adapters":
        from .bottleneck import BottleneckConfig

        return BottleneckConfig(bottleneck_size=policy_args.adapter_size, placement=policy_args.adapter_placement,
                                non_linearity=policy_args.adapter_non_linearity, task_type=task_type)
    raise ConfigError(f"peft_method: unknown method {method!r}")


def compute_dtype(training_args) -> torch.dtype:
    if getattr(training_args, "bf16", False):
        return torch.bfloat16
    if getattr(training_args, "fp16", False):
        return torch.float16
    return torch.float32


def _load_dtype(model_args, training_args, quantized: bool) -> torch.dtype:
    """Weights dtype at load: fp32 on CPU (autocast does bf16 math), the recipe's `dtype` on GPU."""
    if runtime.on_cpu(training_args):
        return torch.float32
    d = getattr(model_args, "dtype", None)
    if d in (None, "auto"):
        return compute_dtype(training_args) if not quantized else torch.float32
    return getattr(torch, d)


def build_policy(model_args, policy_args, training_args, *, task: str = "causal_lm", num_labels: int = 1,
                 tokenizer=None) -> Policy:
    """Load the starting model + tokenizer and decide the PEFT config (applied by the trainer)."""
    source = model_args.model_name_or_path
    if not source:
        raise ConfigError("model_name_or_path: required (a Hub id, a local directory, a .gguf file or 'smollm2-135m-instruct')")
    method = policy_args.resolve_method(model_args)
    trust = bool(getattr(training_args, "trust_remote_code", False))
    if tokenizer is None:
        tokenizer = models.load_tokenizer(source, chat_template=policy_args.chat_template, trust_remote_code=trust,
                                          revision=model_args.model_revision)
    acfg = adapter_config(source)
    peft_type = str(acfg.get("peft_type", "")).upper() if acfg else None
    quant = quantization_config(method, policy_args, model_args, compute_dtype(training_args))
    dtype = _load_dtype(model_args, training_args, quant is not None)
    if acfg is not None and peft_type not in MERGEABLE:
        model, base_name = load_adapter_policy(source, task=task, num_labels=num_labels, dtype=dtype, trust=trust)
        if method not in ("full", _method_of(peft_type)):
            raise ConfigError(
                f"peft_method: {source} holds a {peft_type} adapter, which cannot be merged; train it further "
                f"with peft_method: {_method_of(peft_type)} (got {method})")
        method, peft_cfg, merged = _method_of(peft_type), None, None
        adapter_base = acfg["base_model_name_or_path"]  # the adapter is trained further on the same base
    else:
        model, base_name, merged = load_model(
            source, task=task, num_labels=num_labels, dtype=dtype, quantization=quant, trust_remote_code=trust,
            revision=model_args.model_revision, attn_implementation=model_args.attn_implementation)
        peft_cfg = peft_config_for(method, model_args, policy_args, task=task, model=model)
        adapter_base = None
    models.sync_model_special_tokens(model, tokenizer)
    if task == "causal_lm" and hasattr(model, "config"):
        model.config.use_cache = False
    return Policy(model=model, tokenizer=tokenizer, method=method, peft_config=peft_cfg, source=source,
                  base_model=_origin(base_name), merged_adapter=merged, adapter_base=adapter_base)


def _method_of(peft_type: str) -> str:
    return {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "BOTTLENECK": "adapters"}.get(peft_type, peft_type.lower())


def _origin(name: str) -> str:
    """Follow stage manifests back to the first base model's name."""
    from .artifacts import read_manifest

    m = read_manifest(name) if Path(name).is_dir() else None
    return (m or {}).get("base_model") or name


def load_adapter_policy(path: str, *, task: str, num_labels: int, dtype, trust: bool):
    """Base + a trainable non-mergeable adapter from an earlier stage."""
    from peft import PeftModel

    from . import bottleneck  # noqa: F401  (registers the bottleneck adapter type)

    base_name = adapter_config(path)["base_model_name_or_path"]
    base, origin, _ = load_model(base_name, task=task, num_labels=num_labels, dtype=dtype, trust_remote_code=trust)
    _match_vocab(base, path)
    return PeftModel.from_pretrained(base, path, is_trainable=True), origin


def trainable_summary(model) -> dict:
    """Trainable and total parameter counts (4-bit weights counted at their true size)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions hold 0 local elements
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    pct = 100.0 * trainable / max(total, 1)
    return {"trainable_params": trainable, "total_params": total, "trainable_pct": round(pct, 4)}
