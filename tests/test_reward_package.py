"""reward/ package: reward-model loading (full + LoRA SEQ_CLS), padding-safe scoring, rules, specs, `rlhf score`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from stages.core.errors import ConfigError, DataError, ModelError
from tiny_models import build_model, build_tokenizer

from reward.model import RewardModel, load_reward_model
from reward.rules import (CombinedReward, FormatReward, LengthPenalty, RegexReward, RewardFunction, VerifierReward,
                          as_trl_reward_func, build_reward)
from reward import score_cli

PROMPTS = ["Hello there!", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]]
RESPONSES = ["Hi.", "The capital of France is Paris."]
LONG_P = ["Please answer in lowercase. List three colours: red, green, blue. " * 3, "The quick brown fox " * 6]
LONG_R = ["red, green, blue " * 4, "jumps over the lazy dog " * 3]


def _seq_cls(arch: str, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    tok = build_tokenizer()
    cfg = build_model(arch, vocab_size=len(tok)).config
    cfg.num_labels = 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():  # a non-trivial head so that scores differ between sequences
        model.score.weight.normal_(0, 1.0)
    return model, tok


@pytest.fixture(scope="module")
def full_rm(tmp_path_factory):
    model, tok = _seq_cls("llama")
    out = tmp_path_factory.mktemp("rm-full")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model, tok


@pytest.fixture(scope="module")
def gpt2_rm(tmp_path_factory):
    """Absolute position embeddings: left padding breaks scores unless position ids skip the pads."""
    model, tok = _seq_cls("gpt2")
    out = tmp_path_factory.mktemp("rm-gpt2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model, tok


@pytest.fixture(scope="module")
def lora_rm(tmp_path_factory, tiny_qwen2):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2, num_labels=1)
    peft = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear",
                                           init_lora_weights=False))
    with torch.no_grad():
        peft.base_model.model.score.modules_to_save["default"].weight.normal_(0, 1.0)
    out = tmp_path_factory.mktemp("rm-lora")
    peft.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out, peft


def _reference_scores(model, tok, prompts, responses):
    """One pair at a time, no padding, straight through the HF model."""
    model.eval()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            msgs = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + [{"role": "assistant", "content": r}]
            ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
            out.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return out


def test_full_round_trip(full_rm):
    path, model, tok = full_rm
    rm = load_reward_model(path)
    assert isinstance(rm, RewardModel) and isinstance(rm, RewardFunction)
    assert rm.model.config.pad_token_id == rm.tokenizer.pad_token_id != rm.tokenizer.eos_token_id
    got = rm.score(PROMPTS, RESPONSES)
    assert got == pytest.approx(_reference_scores(model, tok, PROMPTS, RESPONSES), abs=1e-5)
    assert got != pytest.approx([got[0]] * len(got))  # scores actually vary
    assert not rm.model.training


def test_lora_round_trip(lora_rm):
    path, peft = lora_rm
    rm = load_reward_model(path)
    got = rm.score(PROMPTS, RESPONSES)
    assert got == pytest.approx(_reference_scores(peft, build_tokenizer(), PROMPTS, RESPONSES), abs=1e-5)
    assert load_reward_model(path).score(PROMPTS, RESPONSES) == pytest.approx(got, abs=1e-6)


@pytest.mark.parametrize("which", ["full", "gpt2", "lora"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(which, side, full_rm, gpt2_rm, lora_rm):
    rm = load_reward_model({"full": full_rm, "gpt2": gpt2_rm, "lora": lora_rm}[which][0])
    rm.tokenizer.padding_side = side
    alone = [rm.score([p], [r], batch_size=1)[0] for p, r in zip(PROMPTS, RESPONSES)]
    mixed = rm.score(LONG_P + PROMPTS + LONG_P, LONG_R + RESPONSES + LONG_R, batch_size=6)
    assert mixed[2:4] == pytest.approx(alone, abs=1e-5)
    messages = [([{"role": "user", "content": p}] if isinstance(p, str) else p) + [{"role": "assistant", "content": r}]
                for p, r in zip(PROMPTS, RESPONSES)]
    assert rm.score_messages(messages) == pytest.approx(alone, abs=1e-5)


def _split_ids(tok, prompt: str, response: str):
    """Untruncated (prompt tokens incl. the generation prompt, response tokens) for one pair."""
    msgs = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=True,
                                   return_dict=True)["input_ids"]
    assert full[:len(head)] == head
    return list(head), list(full[len(head):])


def _scored_ids(rm, monkeypatch):
    seen = []
    real = rm._forward
    monkeypatch.setattr(rm, "_forward", lambda batch: seen.extend(batch) or real(batch))
    return seen


def test_truncation_trims_the_prompt_start_and_keeps_the_response(full_rm, monkeypatch):
    rm = load_reward_model(full_rm[0])
    prompt, response = _split_ids(rm.tokenizer, LONG_P[0], "ok")
    seen = _scored_ids(rm, monkeypatch)
    before = rm.truncated
    got = rm.score([LONG_P[0]], ["ok"], max_length=20)[0]
    assert rm.truncated == before + 1
    (ids,) = seen
    assert len(ids) == 20 and ids[-len(response):] == response  # the whole response
    assert ids[:20 - len(response)] == prompt[-(20 - len(response)):]  # the prompt's end, its start gone
    with torch.no_grad():
        want = rm.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert got == pytest.approx(want, abs=1e-5)


def test_truncation_of_a_long_response_keeps_its_start(full_rm, monkeypatch):
    """Old scorer kept ids[-limit:], the response's end: a reward model reads an answer from its start."""
    rm = load_reward_model(full_rm[0])
    long_answer = "red, green, blue " * 10
    prompt, response = _split_ids(rm.tokenizer, "Colours?", long_answer)
    seen = _scored_ids(rm, monkeypatch)
    rm.score(["Colours?"], [long_answer], max_length=40)
    (ids,) = seen
    assert len(ids) == 40 and len(response) > 40
    # 40 // 4 = 10 tokens of context, then the first 30 response tokens
    assert ids[:10] == prompt[-10:] and ids[10:] == response[:30]
    assert rm.tokenizer.decode(ids[10:]).startswith("red, green, blue")


def test_scoring_limit_is_the_reward_models_training_max_length(full_rm, tmp_path, monkeypatch):
    rm = load_reward_model(full_rm[0])
    assert rm.max_length is None  # no manifest: model_max_length / the context, as before
    trained = tmp_path / "rm-with-manifest"
    shutil.copytree(full_rm[0], trained)
    (trained / "manifest.json").write_text(json.dumps(
        {"status": "complete", "config": {"training": {"max_length": 24}}}))
    rm = load_reward_model(trained)
    assert rm.max_length == 24
    prompt, response = _split_ids(rm.tokenizer, LONG_P[0], "ok")
    seen = _scored_ids(rm, monkeypatch)
    rm.score([LONG_P[0]], ["ok"])
    assert seen[0] == prompt[-(24 - len(response)):] + response
    assert load_reward_model(trained, max_length=30).max_length == 30  # an explicit limit still wins


def test_full_missing_head_fails_loudly(full_rm, tmp_path):
    from safetensors.torch import load_file, save_file

    src = full_rm[0]
    bad = tmp_path / "rm-no-head"
    shutil.copytree(src, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd.pop("score.weight")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="score.weight"):
        load_reward_model(bad)


def test_causal_lm_is_not_a_reward_model(tiny_llama):
    with pytest.raises(ModelError, match="score.weight"):
        load_reward_model(tiny_llama)


def test_lora_without_head_fails_loudly(lora_rm, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "rm-lora-no-head"
    shutil.copytree(lora_rm[0], bad)
    sd = {k: v for k, v in load_file(str(bad / "adapter_model.safetensors")).items() if "score" not in k}
    save_file(sd, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["modules_to_save"] = None
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="modules_to_save"):
        load_reward_model(bad)


def test_lora_head_that_does_not_land_fails_loudly(lora_rm, monkeypatch):
    import peft.peft_model as pm

    real = pm.set_peft_model_state_dict

    def wrong_head(model, state_dict, *a, **kw):  # simulate a PEFT/transformers key-mapping mismatch
        return real(model, {k: v * 0 if "score" in k else v for k, v in state_dict.items()}, *a, **kw)

    monkeypatch.setattr(pm, "set_peft_model_state_dict", wrong_head)
    with pytest.raises(ModelError, match="did not load"):
        load_reward_model(lora_rm[0])


def test_causal_lm_adapter_rejected(lora_rm, tmp_path):
    bad = tmp_path / "rm-lora-clm"
    shutil.copytree(lora_rm[0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["task_type"] = "CAUSAL_LM"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="SEQ_CLS"):
        load_reward_model(bad)


# -- rules -----------------------------------------------------------------------------------------
def test_rule_rewards():
    prompts = ["q1", [{"role": "user", "content": "q2"}], "q3"]
    responses = ["The answer is 42.", [{"role": "assistant", "content": "no idea"}], "ANSWER: 7"]
    assert RegexReward(r"\d+", reward=2.0, penalty=-1.0).score(prompts, responses) == [2.0, -1.0, 2.0]
    assert RegexReward(r"answer: \d", flags=2).score(prompts, responses) == [0.0, 0.0, 1.0]
    assert LengthPenalty(target_words=4).score(["p"] * 2, ["a b c d", "a b"]) == [0.0, -0.5]
    assert LengthPenalty(max_tokens=2, scale=2.0).score(["p"] * 2, ["a b", "a b c d"]) == [0.0, -2.0]
    tok = build_tokenizer()
    assert LengthPenalty(max_tokens=1000, tokenizer=tok).score(["p"], ["short"]) == [0.0]
    fmt = FormatReward(starts_with="the", ends_with=".", required=["answer"], lowercase=True)
    assert fmt.score(["p"] * 3, ["the answer is red.", "The answer is red.", "the colour is red"]) == [1.0, 0.0, 0.0]
    part = FormatReward(starts_with="the", ends_with=".", partial=True)
    assert part.score(["p"], ["the end"]) == [0.5]
    seen = []
    ver = VerifierReward(lambda p, r: seen.append(p) or ("42" in r), reward=1.0, penalty=-1.0)
    assert ver.score(prompts, responses) == [1.0, -1.0, -1.0]
    assert seen == ["q1", "q2", "q3"]
    assert VerifierReward(lambda p, r: 0.25).score(["p"], ["r"]) == [0.25]
    with pytest.raises(ConfigError):
        RegexReward("(")
    with pytest.raises(ConfigError):
        LengthPenalty()


def test_verifier_accepts_verdict_objects():
    class Verdict:
        def __init__(self, passed):
            self.passed, self.failures, self.checks = passed, [], {}

    assert VerifierReward(lambda p, r: Verdict(r == "ok")).score(["p", "p"], ["ok", "no"]) == [1.0, 0.0]


def test_demo_verifier_reward_on_demo_pairs():
    from stages.core import demo

    pairs = demo.preference_pairs(20)
    f = as_trl_reward_func(build_reward("demo_verifier"))
    prompts = [p["prompt"] for p in pairs]
    assert f(prompts=prompts, completions=[p["chosen"] for p in pairs]) == [1.0] * 20
    assert f(prompts=prompts, completions=[p["rejected"] for p in pairs]) == [0.0] * 20


def test_demo_verifier_partial_credit_counts_the_checks_a_reply_passes():
    prompt = "How do I reset my password?"
    full = build_reward({"demo_verifier": None, "partial": True})
    binary = build_reward("demo_verifier")
    no_signoff = "Hi there! Open settings and choose reset password."
    bare = "open settings"  # no greeting, no sign-off
    partial, passed = full.score([prompt] * 2, [no_signoff, bare]), binary.score([prompt] * 2, [no_signoff, bare])
    assert passed == [0.0, 0.0]  # neither passes every check
    assert 0.0 < partial[1] < partial[0] < 1.0  # but the first passes more of them
    with pytest.raises(ConfigError, match="partial"):
        build_reward({"demo_verifier": None, "partial": "yes"})


def test_combined_weights():
    a, b = RegexReward("x"), RegexReward("y", reward=1.0, penalty=-1.0)
    comb = CombinedReward([(a, 2.0), (b, 0.5)])
    assert comb.score(["p"] * 3, ["xy", "x", "z"]) == [2.5, 1.5, -0.5]
    with pytest.raises(ConfigError, match=r"reward\[1\]"):
        CombinedReward([(a, 1.0), ("nope", 1.0)])


def test_trl_reward_func_strings_and_messages():
    import inspect

    from trl.trainer.utils import get_callable_name

    f = as_trl_reward_func(RegexReward("Paris"), name="paris")
    assert get_callable_name(f) == "paris"
    assert list(inspect.signature(f).parameters)[:2] == ["prompts", "completions"]
    assert f(prompts=["q", "q"], completions=["Paris", "Rome"], completion_ids=[[1], [2]], trainer_state=None) == [1.0, 0.0]
    conv_p = [[{"role": "user", "content": "capital?"}]] * 2
    conv_c = [[{"role": "assistant", "content": "Paris"}], [{"role": "assistant", "content": "Rome"}]]
    assert f(prompts=conv_p, completions=conv_c, completion_ids=[[1], [2]]) == [1.0, 0.0]
    import pickle

    assert pickle.loads(pickle.dumps(f))(prompts=["q"], completions=["Paris"]) == [1.0]


def test_trl_reward_func_with_reward_model(full_rm):
    rm = load_reward_model(full_rm[0])
    f = as_trl_reward_func(rm)
    conv_p = [[{"role": "user", "content": p}] for p in ["Hello there!", "Hi"]]
    conv_c = [[{"role": "assistant", "content": c}] for c in ["Hi.", "Hello"]]
    assert f(prompts=conv_p, completions=conv_c) == pytest.approx(rm.score(["Hello there!", "Hi"], ["Hi.", "Hello"]), abs=1e-6)


def test_build_reward_specs(full_rm, tmp_path):
    r = build_reward([{"regex": "x", "weight": 2.0}, {"format": {"ends_with": "."}, "weight": -1.0}, {"length": {"target_words": 1}}])
    assert isinstance(r, CombinedReward)
    assert r.score(["p", "p"], ["x.", "y z"]) == [1.0, -1.0]
    assert isinstance(build_reward(str(full_rm[0])), RewardModel)
    assert isinstance(build_reward({"model": str(full_rm[0]), "batch_size": 2}), RewardModel)
    assert build_reward('{"regex": "a", "weight": 3}').score(["p"], ["a"]) == [3.0]
    spec = tmp_path / "reward.yaml"
    spec.write_text("- regex: 'a'\n- {verifier: 'operator:contains', weight: 2}\n")
    assert build_reward(str(spec)).score(["pa", "p"], ["a", "a"]) == [3.0, 1.0]
    assert type(build_reward("demo_verifier")).__name__ == "VerifierReward"
    for bad, match in [("no-such-thing", "unknown reward spec"), ([{"regex": "x"}, {"bogus": 1}], r"reward\[1\]"),
                       ([{"regex": "("}], r"reward\[0\]"), ({"regex": "x", "weight": "heavy"}, "weight"),
                       ({"length": {"target_words": 3, "nope": 1}}, "nope"), (str(tmp_path), "holds no model"),
                       ({"verifier": "no_such_mod:f"}, "cannot import"), (42, "unsupported")]:
        with pytest.raises(ConfigError, match=match):
            build_reward(bad)


# -- CLI -------------------------------------------------------------------------------------------
def _write_rows(path: Path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_score_cli(full_rm, tmp_path, capsys):
    rows = [{"prompt": p, "response": r, "id": i} for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
    rows.append({"prompt": "Hi", "completion": "Hello", "id": 2})
    inp, out = tmp_path / "rows.jsonl", tmp_path / "sub" / "scored.jsonl"
    _write_rows(inp, rows)
    assert score_cli.main(["--reward", str(full_rm[0]), "--input", str(inp), "--output", str(out),
                           "--batch_size", "2", "--log_every", "2"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "score"} for g in got] == rows
    want = load_reward_model(full_rm[0]).score(PROMPTS + ["Hi"], RESPONSES + ["Hello"])
    assert [g["score"] for g in got] == pytest.approx(want, abs=1e-5)
    cap = capsys.readouterr()
    assert "2/3 rows" in cap.err and "3/3 rows" in cap.err
    summary = json.loads(cap.out.strip().splitlines()[-1].split("] ", 1)[1])
    assert summary["count"] == 3 and summary["min"] <= summary["mean"] <= summary["max"]
    assert list(out.parent.iterdir()) == [out]  # no temp files left


@pytest.mark.parametrize("bad_row, field", [({"prompt": "p", "response": 3}, "response"),
                                            ({"response": "r"}, "prompt"),
                                            ({"prompt": [{"role": "user"}], "response": "r"}, "prompt"),
                                            ({"prompt": "p"}, "response"),
                                            ("{not json", None)])
def test_score_cli_bad_row(tmp_path, bad_row, field):
    inp, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    _write_rows(inp, [{"prompt": "p", "response": "r"}, bad_row])
    with pytest.raises(DataError) as e:
        score_cli.main(["--reward", '{"regex": "r"}', "--input", str(inp), "--output", str(out)])
    assert str(inp) in str(e.value) and "line 2" in str(e.value)
    if field:
        assert f"field '{field}'" in str(e.value) and e.value.field == field
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_score_cli_no_output_on_scoring_error(tmp_path):
    inp, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    _write_rows(inp, [{"prompt": "p", "response": "r"}])
    with pytest.raises(ConfigError):
        score_cli.main(["--reward", "nonexistent-reward", "--input", str(inp), "--output", str(out)])
    assert not out.exists()
