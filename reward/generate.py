"""Batched, seeded generation with one decoding setup for every model compared, and a generation cache.

Models load as the stages saved them: a LoRA/DoRA/IA3 output is merged into its base
(stages.core.policy.load_model); prefix/prompt/bottleneck adapters load through PeftModel. The tokenizer
(and its chat template) comes from the model dir. Left padding; greedy unless temperature > 0; a prompt
longer than the model's context minus max_new_tokens is trimmed from its start (counted).
Cache: `<cache_dir>/<label>-<key>.json`, key = fingerprint of (model manifest fingerprint or file hashes,
prompts, decoding settings); a hit skips loading the model at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stages.core.artifacts import fingerprint, read_manifest

_FULL_HASH_LIMIT = 64 << 20
_HEAD_BYTES = 8 << 20
_MODEL_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".jinja", ".txt", ".gguf", ".pt")


@dataclass(frozen=True)
class Decoding:
    """Decoding settings shared by the policy and the reference (temperature 0 = greedy)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        from stages.core.errors import ConfigError

        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class Generations:
    responses: list[str]
    n_tokens: list[int]
    truncated_prompts: int = 0
    cached: bool = False
    info: dict = field(default_factory=dict)


# -- loading -------------------------------------------------------------------------------------------
def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_generation(path: str, *, device=None, dtype=None):
    """(model, tokenizer) ready for generation: eval mode, cache on, tokenizer with pad and left padding."""
    import torch

    from stages.core import models, policy

    device = device or default_device()
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    acfg = policy.adapter_config(path) if Path(path).is_dir() else None
    if acfg is not None and str(acfg.get("peft_type", "")).upper() not in policy.MERGEABLE:
        from peft import PeftModel

        from stages.core import bottleneck  # noqa: F401  (registers the bottleneck adapter type)

        base, _, _ = policy.load_model(acfg["base_model_name_or_path"], dtype=dtype)
        policy._match_vocab(base, path)
        model = PeftModel.from_pretrained(base, path)
    else:
        model, _, _ = policy.load_model(path, dtype=dtype)
    tokenizer = models.load_tokenizer(path)
    models.sync_model_special_tokens(model, tokenizer)
    tokenizer.padding_side = "left"
    model.config.use_cache = True
    return model.to(device).eval(), tokenizer


# -- generation ----------------------------------------------------------------------------------------
def context_limit(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    from .rules import as_messages

    if getattr(tokenizer, "chat_template", None):
        return [list(tokenizer.apply_chat_template(as_messages(p), tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]) for p in prompts]
    from .rules import prompt_text

    return [tokenizer(prompt_text(p))["input_ids"] for p in prompts]


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def generate_responses(model, tokenizer, prompts, decoding: Decoding) -> Generations:
    """Responses for `prompts` (strings or message lists), in order. Batches are formed longest-first."""
    import torch
    from transformers import GenerationConfig

    from stages.core.encode import fit_prompt_response

    ids = encode_prompts(tokenizer, prompts)
    limit, truncated = context_limit(model), 0
    if limit is not None:  # the suite's rule with an empty response: trim the prompt from its start
        keep = max(1, limit - decoding.max_new_tokens)
        fitted = [fit_prompt_response(x, [], keep) for x in ids]
        truncated = sum(what is not None for _, _, what in fitted)
        ids = [x for x, _, _ in fitted]
    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    sample = decoding.temperature > 0
    sampling = {"temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": 0} if sample else {}
    gc = GenerationConfig(max_new_tokens=decoding.max_new_tokens, do_sample=sample, pad_token_id=pad,
                          eos_token_id=stop, use_cache=True, **sampling)
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    texts, counts = [""] * len(ids), [0] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for b, s in enumerate(range(0, len(order), decoding.batch_size)):
            idx = order[s:s + decoding.batch_size]
            width = max(len(ids[i]) for i in idx)
            inp = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in idx], device=device)
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in idx], device=device)
            torch.manual_seed(decoding.seed + b)
            with torch.no_grad():
                out = model.generate(input_ids=inp, attention_mask=mask, generation_config=gc)
            for i, row in zip(idx, out[:, width:].tolist()):
                n = next((k for k, t in enumerate(row) if t in stop), len(row))
                texts[i] = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
                counts[i] = n
    finally:
        model.train(was_training)
    return Generations(texts, counts, truncated)


# -- cache ---------------------------------------------------------------------------------------------
def _file_hash(f: Path) -> str:
    h, size = hashlib.sha256(), f.stat().st_size
    with open(f, "rb") as fh:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        else:  # big weight files: size, mtime and the first 8 MB
            h.update(f"{size}:{f.stat().st_mtime_ns}:".encode())
            h.update(fh.read(_HEAD_BYTES))
    return h.hexdigest()[:16]


def model_fingerprint(path) -> dict:
    """What a model's outputs depend on: its finished manifest, else its files (and its adapter's base)."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        return {"name": str(path)}  # a Hub id or alias: the name is all we know
    if p.is_file():
        return {"file": _file_hash(p)}
    m = read_manifest(p)
    if m and m.get("status") == "complete":
        return {"manifest": m.get("fingerprint"), "finished_at": m.get("finished_at")}
    out: dict = {"files": {f.name: _file_hash(f) for f in sorted(p.iterdir())
                           if f.is_file() and f.suffix in _MODEL_SUFFIXES}}
    acfg = p / "adapter_config.json"
    if acfg.is_file():
        base = json.loads(acfg.read_text()).get("base_model_name_or_path")
        if base and Path(base).expanduser().resolve() != p.resolve():
            out["base"] = model_fingerprint(base)
    return out


def cache_key(model_path, prompts, decoding: Decoding) -> str:
    return fingerprint({"model": model_fingerprint(model_path), "prompts": list(prompts), "decoding": asdict(decoding)})


def cached_generate(model_path, prompts, decoding: Decoding, *, cache_dir, label: str = "model", device=None,
                    log=print) -> Generations:
    """Generate with the model at `model_path`, or reuse `<cache_dir>/<label>-<key>.json` when nothing changed."""
    prompts = list(prompts)
    key = cache_key(model_path, prompts, decoding)
    path = Path(cache_dir) / f"{label}-{key}.json"
    if path.is_file():
        try:
            c = json.loads(path.read_text())
            if c.get("key") == key and len(c.get("responses", ())) == len(prompts):
                log(f"{label}: reusing {len(prompts)} cached generations ({path.name})")
                return Generations(c["responses"], c["n_tokens"], c.get("truncated_prompts", 0), cached=True,
                                   info={"cache_file": str(path)})
        except (OSError, json.JSONDecodeError, KeyError):
            pass  # unreadable cache: regenerate
    log(f"{label}: generating {len(prompts)} responses with {model_path}")
    t0 = time.perf_counter()
    model, tokenizer = load_for_generation(str(model_path), device=device)
    gen = generate_responses(model, tokenizer, prompts, decoding)
    del model
    gen.info = {"cache_file": str(path), "seconds": round(time.perf_counter() - t0, 2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "model": str(model_path), "decoding": asdict(decoding),
                               "responses": gen.responses, "n_tokens": gen.n_tokens,
                               "truncated_prompts": gen.truncated_prompts}, ensure_ascii=False))
    os.replace(tmp, path)
    return gen
