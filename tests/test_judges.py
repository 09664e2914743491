"""Judges on cases where the better answer is decidable by construction; position swap; the registry."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from reward.judges import (DEFAULT_TEMPLATE, Judge, OpenAIJudge, PairwiseLLMJudge, RewardModelJudge, ScoreJudge,
                           VerifierJudge, build_judge, judge_detailed, position_swap_outcomes, register_judge)
from stages.core import demo
from stages.core.errors import ConfigError
from tiny_models import build_model, build_tokenizer

PAIRS = demo.load("preference_eval")[:12]
PROMPTS = [r["prompt"] for r in PAIRS]
GOOD = [r["chosen"][0]["content"] for r in PAIRS]  # passes the demo verifier by construction
BAD = [r["rejected"][0]["content"] for r in PAIRS]  # breaks at least one rule by construction


def test_demo_pairs_are_decidable():
    assert all(demo.verify(p, g).passed and not demo.verify(p, b).passed for p, g, b in zip(PROMPTS, GOOD, BAD))


def test_verifier_judge_prefers_the_verified_answer_in_either_slot():
    j = VerifierJudge()
    assert isinstance(j, Judge)
    assert j.judge(PROMPTS, GOOD, BAD) == [1.0] * len(GOOD)
    assert j.judge(PROMPTS, BAD, GOOD) == [0.0] * len(GOOD)
    assert j.judge(PROMPTS, GOOD, GOOD) == [0.5] * len(GOOD)  # equal rewards are ties


def test_verifier_judge_from_any_rule_function_or_reward():
    longer = VerifierJudge(lambda p, r: float(len(r)))
    assert longer.judge(["q", "q", "q"], ["aaa", "a", "aa"], ["a", "aaa", "aa"]) == [1.0, 0.0, 0.5]
    assert build_judge("verifier:stages.core.demo:verify").judge(PROMPTS[:3], BAD[:3], GOOD[:3]) == [0.0] * 3
    rule = build_judge('rule:{"regex": "Cheers"}')  # any reward.rules spec
    assert rule.judge(["q", "q"], ["Cheers!", "bye"], ["bye", "Cheers"]) == [1.0, 0.0]


@pytest.fixture(scope="module")
def exclaim_rm(tmp_path_factory):
    """A reward model whose score is, by construction, highest for a response ending in "!".

    Attention and MLP outputs are zeroed, so the last hidden state is the (RMS-normalised) embedding of
    the last token; the score head points along the embedding of "!". A template without a trailing token
    makes the response's last token the sequence's last token.
    """
    from transformers import AutoModelForSequenceClassification

    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ '\n' if not loop.first }}{{ m['content'] }}{% endfor %}"
    cfg = build_model("llama", vocab_size=len(tok)).config
    cfg.num_labels = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    bang = tok("Sure!", add_special_tokens=False)["input_ids"][-1]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        e = model.model.embed_tokens.weight[bang]
        model.score.weight.copy_((e / e.norm()).unsqueeze(0))
    out = tmp_path_factory.mktemp("rm-exclaim")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_reward_model_judge_prefers_the_higher_scored_answer(exclaim_rm):
    j = build_judge(str(exclaim_rm))  # a sequence-classification dir is a reward-model judge
    assert isinstance(j, RewardModelJudge)
    prompts = ["Say something nice.", "Greet me.", [{"role": "user", "content": "Hello?"}]]
    good = ["Sure thing!", "Hello there!", "Hi!"]
    bad = ["Sure thing.", "Hello there", "Hi,"]
    res = judge_detailed(j, prompts, good, bad)
    assert res.outcomes == [1.0, 1.0, 1.0], res
    assert all(a > b for a, b in zip(res.scores_a, res.scores_b))
    assert j.judge(prompts, bad, good) == [0.0, 0.0, 0.0]
    assert j.judge(prompts, good, good) == [0.5, 0.5, 0.5]  # identical responses score equally: ties
    assert build_judge(f"rm:{exclaim_rm}").name.startswith("reward_model:")


# -- pairwise LLM judge -----------------------------------------------------------------------------------
class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose next-token logits come from `decide(judging_prompt_text) -> "A" | "B" | None`."""

    def __init__(self, tokenizer, decide):
        super().__init__()
        self.tok, self.decide = tokenizer, decide
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], len(self.tok))
        a, b = self.tok("A", add_special_tokens=False)["input_ids"][0], self.tok("B", add_special_tokens=False)["input_ids"][0]
        for i, row in enumerate(input_ids.tolist()):
            real = [t for t, m in zip(row, attention_mask[i].tolist()) if m]
            choice = self.decide(self.tok.decode(real))
            if choice:
                logits[i, -1, a if choice == "A" else b] = 5.0
        return SimpleNamespace(logits=logits)


def _verifier_oracle(text: str):
    """Reads the judging prompt and picks the response that passes the demo verifier."""
    m = re.search(r"\[Request\]\n(.*?)\n\n\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\nWhich", text, re.S)
    prompt, a, b = m.groups()
    va, vb = demo.verify(prompt, a).passed, demo.verify(prompt, b).passed
    return "A" if va and not vb else "B" if vb and not va else None


def test_llm_judge_position_swap_maps_verdicts_back_to_the_right_response():
    tok = build_tokenizer()
    model = ScriptedLM(tok, _verifier_oracle)
    j = PairwiseLLMJudge(model, tok, batch_size=5)
    mixed_a = [g if i % 2 else b for i, (g, b) in enumerate(zip(GOOD, BAD))]
    mixed_b = [b if i % 2 else g for i, (g, b) in enumerate(zip(GOOD, BAD))]
    res = judge_detailed(j, PROMPTS, mixed_a, mixed_b)
    assert res.outcomes == [1.0 if i % 2 else 0.0 for i in range(len(GOOD))]
    assert res.extra["consistency"] == 1.0
    assert res.outcomes == VerifierJudge().judge(PROMPTS, mixed_a, mixed_b)
    assert model.calls == 2 * -(-len(GOOD) // 5)  # both orders, batched


def test_llm_judge_biased_to_always_answer_A_gets_only_ties():
    tok = build_tokenizer()
    j = PairwiseLLMJudge(ScriptedLM(tok, lambda text: "A"), tok)
    res = judge_detailed(j, PROMPTS, GOOD, BAD)
    assert res.outcomes == [0.5] * len(GOOD)
    assert res.extra["verdict_ab"] == ["A"] * len(GOOD) and res.extra["verdict_ba"] == ["A"] * len(GOOD)
    assert res.extra["consistency"] == 0.0
    assert PairwiseLLMJudge(ScriptedLM(tok, lambda text: "B"), tok).judge(PROMPTS, GOOD, BAD) == [0.5] * len(GOOD)


def test_position_swap_rule():
    assert position_swap_outcomes([True, False, True, False, None], [False, True, True, False, True]) == \
        [1.0, 0.0, 0.5, 0.5, 0.5]


def test_llm_judge_on_a_real_tiny_model(tiny_llama):
    j = build_judge(str(tiny_llama))  # a causal LM dir is an LLM judge
    assert isinstance(j, PairwiseLLMJudge)
    res = judge_detailed(j, PROMPTS[:4], GOOD[:4], BAD[:4])
    assert set(res.outcomes) <= {0.0, 0.5, 1.0} and len(res.outcomes) == 4
    assert len(res.extra["margin_ab"]) == 4 and 0.0 <= res.extra["consistency"] <= 1.0
    # the same pair in both slots: the swap makes any positional preference a tie
    assert j.judge(PROMPTS[:2], GOOD[:2], GOOD[:2]) == [0.5, 0.5]


def test_judging_prompt_shows_both_responses_in_order():
    j = PairwiseLLMJudge(ScriptedLM(build_tokenizer(), lambda t: None), build_tokenizer())
    text = j.render(["Q?"], ["first"], ["second"])[0]
    assert text == DEFAULT_TEMPLATE.format(prompt="Q?", response_a="first", response_b="second")


# -- endpoint judge and registry --------------------------------------------------------------------------
def test_openai_judge_builds_without_network_and_parses_replies(monkeypatch):
    j = build_judge("openai:my-model@http://127.0.0.1:9/v1")
    assert isinstance(j, OpenAIJudge) and j.base_url == "http://127.0.0.1:9/v1" and j.model == "my-model"
    # the endpoint answers "A" whenever the first response shown is the good one
    monkeypatch.setattr(j, "_ask", lambda text: "A" if _verifier_oracle(text) == "A" else "B.")
    assert j.judge(PROMPTS[:4], GOOD[:4], BAD[:4]) == [1.0] * 4
    monkeypatch.setattr(j, "_ask", lambda text: "I cannot decide")
    assert j.judge(PROMPTS[:2], GOOD[:2], BAD[:2]) == [0.5, 0.5]


def test_registry_plugins_and_errors(tmp_path):
    class Coin:
        name = "coin"

        def __init__(self, arg):
            self.arg = arg

        def judge(self, prompts, a, b):
            return [1.0 if self.arg == "heads" else 0.0] * len(prompts)

    register_judge("coin_test", lambda arg, **kw: Coin(arg))
    assert build_judge("coin_test:heads").judge(["p"], ["a"], ["b"]) == [1.0]
    assert build_judge({"type": "coin_test", "arg": "tails"}).judge(["p"], ["a"], ["b"]) == [0.0]
    with pytest.raises(ValueError, match="already registered"):
        register_judge("coin_test", lambda arg: Coin(arg))
    j = VerifierJudge()
    assert build_judge(j) is j
    assert isinstance(build_judge("demo_verifier"), VerifierJudge)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"regex": "!"}, {"length": {"target_words": 3}, "weight": 0.5}]))
    assert isinstance(build_judge(str(rules)), ScoreJudge)
    for bad in ("nonsense-judge", "", str(tmp_path), {"type": "nope"}, 3):
        with pytest.raises(ConfigError):
            build_judge(bad)
    with pytest.raises(ConfigError, match="cannot import"):
        build_judge("verifier:no.such.module:fn")
    with pytest.raises(ValueError, match="prompts"):
        judge_detailed(j, ["p"], ["a", "b"], ["c"])
