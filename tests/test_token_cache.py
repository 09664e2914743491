"""Tokenised rows are cached across stages and runs, keyed by everything they depend on."""
import json
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from stages.core import encode as E
from stages.core import token_cache as T


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_SUITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenized"


@pytest.fixture
def rows():
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"q {i}"},
                                            {"role": "assistant", "content": "a " * (i + 1)}]} for i in range(6)])


def counting(fn):
    calls = []

    def wrapped(*a, **k):
        calls.append(1)
        return fn(*a, **k)

    wrapped.__name__, wrapped.calls = fn.__name__, calls
    return wrapped


def test_second_encode_is_served_from_the_cache_with_identical_rows(cache, rows, tiny_llama):
    tok, fn = AutoTokenizer.from_pretrained(tiny_llama), counting(E.encode_sft)
    first, rep1 = T.encode_cached(fn, rows, tok, rows_fingerprint="fp", max_length=12)
    second, rep2 = T.encode_cached(fn, rows, tok, rows_fingerprint="fp", max_length=12)
    assert len(fn.calls) == 1 and len(list(cache.iterdir())) == 1
    assert second.to_dict() == first.to_dict() and rep2.to_dict() == rep1.to_dict()
    assert rep1.over_limit > 0  # the length report survives the round trip, not just the rows
    # the writer gets the on-disk copy too, so every rank of a distributed run holds the same dataset files
    assert first.cache_files and first.cache_files == second.cache_files


def test_rows_settings_or_tokenizer_changes_miss_the_cache(cache, rows, tiny_llama):
    tok, fn = AutoTokenizer.from_pretrained(tiny_llama), counting(E.encode_sft)
    T.encode_cached(fn, rows, tok, rows_fingerprint="fp", max_length=12)
    T.encode_cached(fn, rows, tok, rows_fingerprint="fp", max_length=64)
    T.encode_cached(fn, rows.select(range(3)), tok, rows_fingerprint="other", max_length=12)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    T.encode_cached(fn, rows, tok, rows_fingerprint="fp", max_length=12)
    assert len(fn.calls) == 4 and len(list(cache.iterdir())) == 4


def test_a_damaged_entry_is_rebuilt_and_disabled_cache_writes_nothing(cache, rows, tiny_llama):
    tok, fn = AutoTokenizer.from_pretrained(tiny_llama), counting(E.encode_sft)
    T.encode_cached(fn, rows, tok, rows_fingerprint="fp", max_length=None)
    entry = next(cache.iterdir())
    for f in (entry / "data").glob("*.arrow"):
        f.write_bytes(b"garbage")
    ds, _ = T.encode_cached(fn, rows, tok, rows_fingerprint="fp", max_length=None)
    assert len(fn.calls) == 2 and len(ds) == len(rows)
    T.encode_cached(fn, rows, tok, rows_fingerprint="fp2", max_length=None, enabled=False)
    assert len(fn.calls) == 3 and len(list(cache.iterdir())) == 1


def test_stages_share_the_cache_across_runs(cache, tiny_llama, tmp_path, capsys):
    from stages import sft

    recipe = str(Path(__file__).resolve().parents[1] / "recipes/tiny/sft.yaml")
    for out in ("a", "b"):
        sft.main(["--config", recipe, "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / out),
                  "--max_steps", "1"])
    err = capsys.readouterr().out
    assert err.count("tokenised rows from the cache") == 2  # run b: train and validation splits
    a, b = (json.loads((tmp_path / o / "manifest.json").read_text()) for o in ("a", "b"))
    assert a["metrics"]["lengths"] == b["metrics"]["lengths"]
