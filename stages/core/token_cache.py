"""Tokenised datasets cached across stages and runs.

The key is everything the encoded rows depend on: the rows' content fingerprint (from the data report),
the tokenizer (vocabulary, merges, special tokens and chat template), the encoding settings, and the
source of the encoding code itself, so an edit to `encode.py` can never serve stale rows. Entries live
under `$RLHF_SUITE_CACHE/tokenized/` (default ~/.cache/rlhf-suite) and are written atomically; a
damaged entry is rebuilt. `tokenized_cache: false` in a recipe turns this off.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from . import encode as E
from .models import cache_dir


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:  # slow tokenizers: the vocabulary stands for the model files
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode("utf-8"))
    h.update(json.dumps([str(tokenizer.bos_token), str(tokenizer.eos_token), str(tokenizer.pad_token),
                         tokenizer.padding_side, tokenizer.truncation_side]).encode("utf-8"))
    return h.hexdigest()


def _code_fingerprint() -> str:
    return hashlib.sha256(Path(E.__file__).read_bytes()).hexdigest()


def cache_key(fn_name: str, rows_fingerprint: str, tokenizer, settings: dict) -> str:
    parts = [fn_name, rows_fingerprint, tokenizer_fingerprint(tokenizer), _code_fingerprint(),
             json.dumps(settings, sort_keys=True, default=str)]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:40]


def encode_cached(fn, rows, tokenizer, *, rows_fingerprint: str | None, enabled: bool = True, log=None, **settings):
    """`fn(rows, tokenizer, **settings)` -> (Dataset, LengthReport), served from the cache when the key matches."""
    if not enabled or not rows_fingerprint:
        return fn(rows, tokenizer, **settings)
    entry = cache_dir() / "tokenized" / cache_key(fn.__name__, rows_fingerprint, tokenizer, settings)
    if (entry / "report.json").is_file():
        hit = _load(entry, log)
        if hit is not None:
            if log:
                log(f"tokenised rows from the cache ({len(hit[0])} rows, {entry.name[:12]})")
            return hit
    dataset, report = fn(rows, tokenizer, **settings)
    tmp = entry.parent / f".{entry.name}.{os.getpid()}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        dataset.save_to_disk(str(tmp / "data"))
        (tmp / "report.json").write_text(json.dumps(report.to_dict()))
        if not entry.exists():
            os.replace(tmp, entry)
    except OSError as exc:  # a full or read-only disk costs the cache, never the run; a lost race is fine
        if log and not entry.exists():
            log(f"could not cache tokenised rows ({exc}); continuing without the cache")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Every process of a distributed run returns the same on-disk dataset, whoever wrote it: TRL keeps
    # per-dataset cache files (e.g. precomputed reference log-probs) next to it and other ranks read them.
    written = _load(entry, None) if (entry / "report.json").is_file() else None
    return written if written is not None else (dataset, report)


def _load(entry: Path, log):
    from datasets import load_from_disk

    try:
        report = E.LengthReport(**json.loads((entry / "report.json").read_text()))
        return load_from_disk(str(entry / "data")), report
    except Exception as exc:  # damaged or from another datasets version: rebuild it
        if log:
            log(f"tokenised-rows cache entry {entry.name[:12]} unreadable ({type(exc).__name__}); rebuilding it")
        shutil.rmtree(entry, ignore_errors=True)
        return None
