"""Pairwise judges: `judge(prompts, responses_a, responses_b) -> [1 | 0.5 | 0]` from A's viewpoint (0.5 = tie).

Built in: a reward-model judge (higher score wins), a verifier/rule judge (higher reward wins), a pairwise
LLM judge (a local instruct model, asked in both orders; inconsistent verdicts are ties) and an
OpenAI-compatible endpoint judge. `build_judge(spec)` builds one from a name/spec; `register_judge`
adds more. Judges may also offer `judge_detailed(...) -> Judgement` with scores and extras for the report.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from stages.core.errors import ConfigError

from .rules import build_reward, demo_verifier_reward, prompt_text, response_text, VerifierReward


@runtime_checkable
class Judge(Protocol):
    name: str

    def judge(self, prompts: list, responses_a: list, responses_b: list) -> list[float]: ...


@dataclass
class Judgement:
    outcomes: list[float]
    scores_a: list[float] | None = None
    scores_b: list[float] | None = None
    extra: dict = field(default_factory=dict)  # per-item lists (e.g. raw verdicts) and summary numbers


def judge_detailed(judge: Judge, prompts, responses_a, responses_b) -> Judgement:
    """A Judgement from any judge (scores and extras only where the judge provides them)."""
    prompts, responses_a, responses_b = list(prompts), list(responses_a), list(responses_b)
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} A responses, {len(responses_b)} B responses")
    if hasattr(judge, "judge_detailed"):
        return judge.judge_detailed(prompts, responses_a, responses_b)
    return Judgement([float(o) for o in judge.judge(prompts, responses_a, responses_b)])


def compare_scores(a: list[float], b: list[float], tol: float = 0.0) -> list[float]:
    return [1.0 if x > y + tol else 0.0 if y > x + tol else 0.5 for x, y in zip(a, b)]


class _DetailedJudge:
    def judge(self, prompts, responses_a, responses_b) -> list[float]:
        return self.judge_detailed(prompts, responses_a, responses_b).outcomes


class ScoreJudge(_DetailedJudge):
    """Any scorer with `.score(prompts, responses)`: the higher score wins, equal scores (within tol) tie."""

    def __init__(self, scorer, name: str | None = None, tol: float = 0.0):
        if not hasattr(scorer, "score"):
            raise ConfigError(f"judge: {scorer!r} has no .score(prompts, responses) method")
        self.scorer, self.tol = scorer, float(tol)
        self.name = name or type(scorer).__name__

    def judge_detailed(self, prompts, responses_a, responses_b) -> Judgement:
        a = [float(v) for v in self.scorer.score(list(prompts), list(responses_a))]
        b = [float(v) for v in self.scorer.score(list(prompts), list(responses_b))]
        return Judgement(compare_scores(a, b, self.tol), a, b)


class RewardModelJudge(ScoreJudge):
    """A trained reward model (full or SEQ_CLS adapter dir): the response with the higher reward wins."""

    def __init__(self, path, *, batch_size: int = 8, max_length: int | None = None, device=None):
        from .model import load_reward_model

        super().__init__(load_reward_model(path, batch_size=batch_size, max_length=max_length, device=device),
                         name=f"reward_model:{path}")


class VerifierJudge(ScoreJudge):
    """Rule functions: `fn(prompt, response) -> bool | float | Verdict` or any reward.rules reward; higher wins."""

    def __init__(self, rule=None, name: str | None = None):
        if rule is None:
            rule, name = demo_verifier_reward(), name or "verifier:demo"
        elif not hasattr(rule, "score"):
            rule = VerifierReward(rule)
        super().__init__(rule, name=name or f"verifier:{getattr(rule, '__name__', type(rule).__name__)}")


DEFAULT_TEMPLATE = (
    "You are comparing two responses to the same request. Decide which response is better: more helpful, "
    "correct, and following every instruction in the request. Answer with a single letter: A or B.\n\n"
    "[Request]\n{prompt}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\n"
    "Which response is better? Answer A or B."
)


def _conversation_text(prompt) -> str:
    if isinstance(prompt, str) or len(prompt) == 1:
        return prompt_text(prompt)
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def position_swap_outcomes(first: list[bool], second: list[bool]) -> list[float]:
    """first[i]: "A" preferred with (a, b) shown; second[i]: "A" preferred with (b, a) shown.

    Both orders must pick the same response; a disagreement (or a missing verdict, None) is a tie.
    """
    return [1.0 if f is True and s is False else 0.0 if f is False and s is True else 0.5
            for f, s in zip(first, second)]


class PairwiseJudgeBase(_DetailedJudge):
    """Shared position-swap logic: subclasses give `prefer_a(judging_prompts) -> list[bool]`."""

    template = DEFAULT_TEMPLATE

    def render(self, prompts, first, second) -> list[str]:
        return [self.template.format(prompt=_conversation_text(p), response_a=response_text(x),
                                     response_b=response_text(y)) for p, x, y in zip(prompts, first, second)]

    def prefer_a(self, texts: list[str]) -> tuple[list, list[float] | None]:  # pragma: no cover - abstract
        """For each judging prompt: True ("A"), False ("B") or None (no verdict); optional margins."""
        raise NotImplementedError

    def judge_detailed(self, prompts, responses_a, responses_b) -> Judgement:
        prompts, responses_a, responses_b = list(prompts), list(responses_a), list(responses_b)
        v1, m1 = self.prefer_a(self.render(prompts, responses_a, responses_b))
        v2, m2 = self.prefer_a(self.render(prompts, responses_b, responses_a))
        outcomes = position_swap_outcomes(v1, v2)
        consistent = [o != 0.5 for o in outcomes]
        letter = {True: "A", False: "B", None: "?"}
        extra = {"verdict_ab": [letter[v] for v in v1], "verdict_ba": [letter[v] for v in v2],
                 "consistency": sum(consistent) / len(consistent) if consistent else None}
        if m1 is not None and m2 is not None:  # log p(A) - log p(B), per order
            extra["margin_ab"], extra["margin_ba"] = m1, m2
        return Judgement(outcomes, extra=extra)


class PairwiseLLMJudge(PairwiseJudgeBase):
    """A local (instruct) causal LM compares log p("A") with log p("B") as its next token, in both orders."""

    def __init__(self, model=None, tokenizer=None, *, path: str | None = None, template: str | None = None,
                 batch_size: int = 8, device=None):
        import torch

        if model is None:
            from .generate import load_for_generation

            if path is None:
                raise ConfigError("llm judge: give a model directory (llm:DIR)")
            model, tokenizer = load_for_generation(path, device=device)
        self.model, self.tokenizer = model, tokenizer
        self.template, self.batch_size = template or DEFAULT_TEMPLATE, batch_size
        self.name = f"llm:{path or getattr(model, 'name_or_path', type(model).__name__)}"
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.ids_a, self.ids_b = self._letter_ids("A"), self._letter_ids("B")
        from .generate import context_limit

        self.max_length = (context_limit(model) if hasattr(model, "config") else None) or 10**9

    def _letter_ids(self, letter: str) -> list[int]:
        ids = set()
        for variant in (letter, " " + letter):
            toks = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(toks) == 1:  # only whole-letter tokens ("A", "ĠA"), never a bare space
                ids.add(toks[0])
        if not ids:
            raise ConfigError(f"llm judge: the tokenizer has no single token for {letter!r}")
        return sorted(ids)

    def _encode(self, text: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                     add_generation_prompt=True, return_dict=True)
            return list(out["input_ids"])
        return self.tokenizer(text + "\nAnswer:", add_special_tokens=True)["input_ids"]

    def prefer_a(self, texts):
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        margins = []
        for s in range(0, len(texts), self.batch_size):
            batch = [self._encode(t)[-self.max_length:] for t in texts[s:s + self.batch_size]]  # keep the question
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])  # left padding: last column is real
            mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=pos.to(self.device)).logits[:, -1].float()
            logp = torch.log_softmax(logits, -1)
            la = torch.logsumexp(logp[:, self.ids_a], -1)
            lb = torch.logsumexp(logp[:, self.ids_b], -1)
            margins += (la - lb).cpu().tolist()
        return [m > 0 if m != 0 else None for m in margins], margins


class OpenAIJudge(PairwiseJudgeBase):
    """An OpenAI-compatible chat endpoint (vLLM, llama.cpp server, ...), asked in both orders; replies parsed for A/B.

    Optional: never used in tests (no network). The key comes from $OPENAI_API_KEY when set.
    """

    def __init__(self, model: str, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 60.0,
                 template: str | None = None):
        import os

        self.model, self.timeout = model, timeout
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "http://localhost:8000/v1").rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.template = template or DEFAULT_TEMPLATE
        self.name = f"openai:{model}@{self.base_url}"

    def _ask(self, text: str) -> str:
        import urllib.request

        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": text}], "max_tokens": 1,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 (user-given endpoint)
            reply = json.loads(r.read())
        return str(reply["choices"][0]["message"]["content"]).strip().upper()

    def prefer_a(self, texts):
        replies = [self._ask(t) for t in texts]
        return [True if r.startswith("A") else False if r.startswith("B") else None for r in replies], None


# -- registry ----------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable] = {}
_LAZY: set[str] = set()  # judges that load models: built only when needed (after generation)
SPEC_HELP = ("verifier | demo_verifier | verifier:module:function | rule:REWARD_SPEC | rm:DIR | llm:DIR | "
             "openai:MODEL[@BASE_URL] | a model directory (reward model or causal LM) | a JSON/YAML rule file")


def register_judge(name: str, factory: Callable | None = None, *, lazy: bool = False):
    """Register `factory(arg: str | None, **options) -> Judge` under `name` (usable as a decorator).

    lazy=True for judges that load models: a spec is then only checked by name until the judge is needed.
    """
    def add(f):
        if name in _REGISTRY:
            raise ValueError(f"judge {name!r} is already registered")
        _REGISTRY[name] = f
        if lazy:
            _LAZY.add(name)
        return f
    return add(factory) if factory is not None else add


def _import_callable(ref: str):
    mod, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"judge: cannot import {ref!r} (expected 'module:function'): {e}") from None


def _verifier(arg, **kw):
    return VerifierJudge(_import_callable(arg) if arg else None, name=f"verifier:{arg}" if arg else None, **kw)


def _openai(arg, **kw):
    if not arg:
        raise ConfigError("judge: openai:MODEL[@BASE_URL]")
    model, _, url = arg.partition("@")
    return OpenAIJudge(model, url or None, **kw)


register_judge("verifier", _verifier)
register_judge("demo_verifier", lambda arg, **kw: VerifierJudge(**kw))
register_judge("rule", lambda arg, **kw: VerifierJudge(build_reward(arg, _where="judge"), name=f"rule:{arg}", **kw))
register_judge("rm", lambda arg, **kw: RewardModelJudge(arg, **kw), lazy=True)
register_judge("llm", lambda arg, **kw: PairwiseLLMJudge(path=arg, **kw), lazy=True)
register_judge("openai", _openai)


def _kind_of_dir(p: Path) -> str:
    acfg = p / "adapter_config.json"
    if acfg.is_file():
        return "rm" if str(json.loads(acfg.read_text()).get("task_type", "")).upper() == "SEQ_CLS" else "llm"
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"judge: directory {p} holds no model (no config.json or adapter_config.json)")
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return "rm" if any(a.endswith("ForSequenceClassification") for a in archs) else "llm"


def _parse_spec(spec) -> tuple[str, str | None, dict]:
    if isinstance(spec, dict):
        opts = dict(spec)
        name = opts.pop("type", None)
        if name not in _REGISTRY:
            raise ConfigError(f"judge: unknown type {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
        return name, opts.pop("arg", None), opts
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"judge: unsupported spec {spec!r}; expected {SPEC_HELP}")
    s = spec.strip()
    name, sep, arg = s.partition(":")
    p = Path(s).expanduser()
    if name in _REGISTRY and not p.exists():
        return name, (arg if sep else None), {}
    if p.is_dir():
        return _kind_of_dir(p), str(p), {}
    if (p.is_file() and p.suffix in (".json", ".yaml", ".yml")) or s[:1] in "[{":
        return "rule", s, {}
    raise ConfigError(f"judge: unknown spec {spec!r}; expected {SPEC_HELP}")


def resolve_judge(spec, **options) -> Callable[[], Judge]:
    """Check a judge spec now and return a thunk giving the judge; model-loading judges load on the first call."""
    if isinstance(spec, Judge) or hasattr(spec, "judge_detailed"):
        return lambda: spec
    name, arg, opts = _parse_spec(spec)
    if name in _LAZY:
        return lambda: _REGISTRY[name](arg, **opts, **options)
    judge = _REGISTRY[name](arg, **opts, **options)  # cheap: build now, so bad rules fail early
    return lambda: judge


def build_judge(spec, **options) -> Judge:
    """A judge from a spec (see SPEC_HELP), a dict {"type": NAME, "arg": ..., **options}, or a Judge instance."""
    return resolve_judge(spec, **options)()
