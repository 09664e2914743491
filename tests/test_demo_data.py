"""The built-in demo data: deterministic generators, the rule verifier, splits and files."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stages.core import demo
from stages.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
G, S = demo.GREETING, demo.SIGNOFF


def _prompt(row: dict) -> str:
    return (row["messages"] if "messages" in row else row["prompt"])[0]["content"]


def _reply(body: str) -> str:
    return f"{G}\n{body}\n{S}"


def _words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: demo.load(name) for name in demo.NAMES}


# --- determinism --------------------------------------------------------------------------------
def test_same_args_same_output_and_seed_matters():
    assert demo.sft_examples(50, 5) == demo.sft_examples(50, 5)
    assert demo.preference_pairs(50, 5) == demo.preference_pairs(50, 5)
    assert demo.heldout_prompts(20, 5) == demo.heldout_prompts(20, 5)
    assert demo.sft_examples(50, 5) != demo.sft_examples(50, 6)
    assert demo.preference_pairs(50, 5) != demo.preference_pairs(50, 6)
    assert demo.heldout_prompts(20, 5) != demo.heldout_prompts(20, 6)


def test_global_random_state_is_untouched():
    import random
    random.seed(123)
    expected = random.random()
    random.seed(123)
    demo.sft_examples(20)
    assert random.random() == expected


def _digest(rows_by_name: dict) -> str:
    return hashlib.sha256(json.dumps(rows_by_name, sort_keys=True).encode()).hexdigest()


def test_identical_across_processes_and_hash_seeds(data, tmp_path):
    """Another interpreter with a different PYTHONHASHSEED produces byte-identical data, via the CLI."""
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "stages.core.demo", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    from_files = {n: [json.loads(ln) for ln in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in demo.NAMES}
    assert _digest(from_files) == _digest(data)


# --- the generated sets ---------------------------------------------------------------------------
def test_sizes_shapes_and_no_duplicates(data):
    assert [len(data[n]) for n in demo.NAMES] == [400, 64, 400, 64, 64]
    for name, rows in data.items():
        prompts = [_prompt(r) for r in rows]
        assert len(set(prompts)) == len(prompts), name
    for row in data["sft"] + data["sft_eval"]:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    for row in data["preference"] + data["preference_eval"]:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    assert all(set(r) == {"prompt"} and r["prompt"][0]["role"] == "user" for r in data["prompts"])


def test_sft_and_chosen_pass_rejected_fail(data):
    for row in data["sft"] + data["sft_eval"]:
        v = demo.verify(row["messages"][0]["content"], row["messages"][1]["content"])
        assert v.passed, (row, v)
    for row in data["preference"] + data["preference_eval"]:
        p = row["prompt"][0]["content"]
        assert demo.verify(p, row["chosen"][0]["content"]).passed, row
        assert not demo.verify(p, row["rejected"][0]["content"]).passed, row


def test_rejected_violations_are_varied(data):
    fails = [demo.verify(r["prompt"][0]["content"], r["rejected"][0]["content"]).failures for r in data["preference"]]
    kinds = Counter(f for fs in fails for f in fs)
    for check in ("greeting", "signoff", "on_topic", "lowercase", "word_limit", "keyword", "bullets"):
        assert kinds[check] >= 20, kinds
    counts = Counter(len(fs) for fs in fails)
    assert counts[1] >= 100 and sum(c for k, c in counts.items() if k > 1) >= 100, counts


def test_every_rule_appears_in_prompts(data):
    checks = Counter(k for r in data["sft"] for k in demo.verify(_prompt(r), "").checks)
    for rule in ("lowercase", "word_limit", "keyword", "bullets"):
        assert 60 <= checks[rule] <= 250, checks
    assert checks["on_topic"] == 400


def test_length_balance_of_chosen_and_rejected(data):
    chosen = [_words(r["chosen"][0]["content"]) for r in data["preference"]]
    rejected = [_words(r["rejected"][0]["content"]) for r in data["preference"]]
    mc, mr = sum(chosen) / len(chosen), sum(rejected) / len(rejected)
    assert abs(mc - mr) / mc < 0.25, (mc, mr)


def test_sequences_stay_short(data):
    for name, rows in data.items():
        for row in rows:
            assert _words(_prompt(row)) < 40, row
            for key in ("messages", "chosen", "rejected"):
                if key in row:
                    assert _words(row[key][-1]["content"]) < 50, row


def test_splits_are_disjoint(data):
    sets = {n: {_prompt(r) for r in rows} for n, rows in data.items()}
    train = sets["sft"] | sets["preference"]
    assert not sets["prompts"] & (train | sets["sft_eval"] | sets["preference_eval"])
    assert not sets["sft_eval"] & train and not sets["preference_eval"] & train
    held = [re.compile(rf"\b{k}\b", re.I) for k in demo.HELDOUT_SUBJECTS]
    for p in train | sets["sft_eval"] | sets["preference_eval"]:
        assert not any(h.search(p) for h in held), p
    assert all(any(h.search(p) for h in held) for p in sets["prompts"])
    # Even freshly seeded training sets never touch a held-out prompt.
    fresh = {_prompt(r) for r in demo.sft_examples(300, seed=99) + demo.preference_pairs(300, seed=98)}
    assert not fresh & sets["prompts"] and not fresh & (sets["sft_eval"] | sets["preference_eval"])


# --- the verifier on hand-written cases -----------------------------------------------------------
def _fails(prompt: str, response: str) -> list[str]:
    return demo.verify(prompt, response).failures


def test_verify_voice_rules():
    p = "Tell me about a banana."
    assert demo.verify(p, _reply("A banana is usually yellow.")).passed
    assert _fails(p, "A banana is usually yellow.\n" + S) == ["greeting"]
    assert _fails(p, "Hello!\nA banana is usually yellow.\n" + S) == ["greeting"]
    assert _fails(p, G + "\nA banana is usually yellow.") == ["signoff"]
    assert _fails(p, G + "\nA banana is usually yellow.\n- Acme") == ["signoff"]
    assert _fails(p, "A banana is yellow.") == ["greeting", "signoff"]
    assert _fails(p, f"{G}\n{S}") == ["nonempty", "on_topic"]
    assert "max_words" in _fails(p, _reply("A banana is yellow. " * 11))
    assert demo.verify(p, f"  {G} A banana is yellow.\n{S}\n").passed  # greeting inline, whitespace tolerated


def test_verify_on_topic():
    assert _fails("Describe a banana.", _reply("That is a great question, and I am happy to help.")) == ["on_topic"]
    assert demo.verify("What is the capital of France?", _reply("The capital of France is Paris.")).passed
    assert demo.verify("Describe a cloud.", _reply("Clouds float in the sky.")).passed  # plural counts
    # A keyword in the rule is not the subject; prompts without a known subject skip the check.
    v = demo.verify("Describe a lemon. Mention the word 'cat'.", _reply("It is sour. A cat would not eat it."))
    assert v.failures == ["on_topic"]
    assert "on_topic" not in demo.verify("How are you?", _reply("I am well.")).checks


def test_verify_lowercase():
    p = "Describe Monday. Answer in lowercase."
    assert demo.verify(p, _reply("monday is a day of the week.")).passed
    assert _fails(p, _reply("Monday is a day of the week.")) == ["lowercase"]
    assert "lowercase" not in demo.verify("Describe Monday.", _reply("Monday is a day.")).checks


def test_verify_word_limit():
    p = "Describe a cat. Use at most 5 words."
    assert demo.verify(p, _reply("A cat purrs when happy.")).passed  # exactly 5
    assert _fails(p, _reply("A cat purrs when it is happy.")) == ["word_limit"]
    assert demo.verify(p, "Hi there!\n- A cat purrs.\n- Cats nap.\n" + S).passed  # bullet marks are not words


def test_verify_keyword():
    p = "Describe a river. Mention the word 'lovely'."
    assert demo.verify(p, _reply("A river is long. It is Lovely.")).passed  # case-insensitive
    assert _fails(p, _reply("A river is long. It is special.")) == ["keyword"]
    assert _fails(p, _reply("A river is long and lovelyish.")) == ["keyword"]  # whole words only


def test_verify_bullets():
    p = "Describe a dog. Answer with a bulleted list of 2 items."
    assert demo.verify(p, f"{G}\n- A dog barks.\n- It likes treats.\n{S}").passed
    assert _fails(p, f"{G}\n- A dog barks.\n- It likes treats.\n- It runs.\n{S}") == ["bullets"]
    assert _fails(p, f"{G}\n1. A dog barks.\n2. It likes treats.\n{S}") == ["bullets"]
    assert _fails(p, _reply("A dog barks. It likes treats.")) == ["bullets"]


def test_verify_several_rules_and_message_inputs():
    p = "What is a cow? Answer in lowercase. Use at most 8 words. Mention the word 'special'."
    good = _reply("a cow says moo. it is special.")
    assert demo.verify(p, good).passed
    assert set(demo.verify(p, good).checks) == {"greeting", "signoff", "nonempty", "max_words", "on_topic",
                                                "lowercase", "word_limit", "keyword"}
    bad = "Sure!\nA cow is an animal that says moo and eats grass."
    assert _fails(p, bad) == ["greeting", "signoff", "lowercase", "word_limit", "keyword"]
    assert demo.verify([{"role": "user", "content": p}], [{"role": "assistant", "content": good}]).passed


def test_pass_rate():
    p = ["Describe a cat.", "Describe a dog.", "Describe a cow.", "Describe a fox."]
    r = [_reply("A cat purrs."), _reply("A dog barks."), "A cow moos.", _reply("Nice!")]
    assert demo.pass_rate(p, r) == 0.5
    assert demo.pass_rate(p[:2], r[:2]) == 1.0 and demo.pass_rate(p[2:], r[2:]) == 0.0
    assert demo.pass_rate([], []) == 0.0
    with pytest.raises(ValueError):
        demo.pass_rate(p, r[:3])


def test_base_style_answers_fail(data):
    """Plain helpful answers without the house voice never pass; the chain's base model sits near 0."""
    prompts = [r["prompt"][0]["content"] for r in data["prompts"]]
    plain = ["Sure! " + " ".join(demo._BY_KEY[k.lower()].facts[:2]) for k in
             [next(h for h in demo.HELDOUT_SUBJECTS if re.search(rf"\b{h}\b", p, re.I)) for p in prompts]]
    assert demo.pass_rate(prompts, plain) == 0.0


# --- files ----------------------------------------------------------------------------------------
def test_write_all_matches_memory(data, tmp_path):
    paths = demo.write_all(tmp_path / "demo")
    assert set(paths) == set(demo.NAMES)
    for name, path in paths.items():
        assert path == tmp_path / "demo" / f"{name}.jsonl" and path.is_file()
        assert [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()] == data[name]
    assert data["sft"] == demo.sft_examples() and data["preference"] == demo.preference_pairs()
    assert data["prompts"] == demo.heldout_prompts()


def test_rlhf_demo_data_command(data, tmp_path, capsys):
    from stages.cli import main
    assert main(["demo-data", str(tmp_path)]) == 0
    assert "sft:" in capsys.readouterr().out
    assert [json.loads(ln) for ln in (tmp_path / "prompts.jsonl").read_text().splitlines()] == data["prompts"]
    assert demo.cli([]) == 2 and demo.cli(["--help"]) == 0


def test_load_unknown_name():
    with pytest.raises(ConfigError, match="unknown demo dataset"):
        demo.load("nope")
