"""Rule-based rewards sharing the reward model's interface: `.score(prompts, responses) -> list[float]`.

Prompts may be strings or message lists; responses strings or (assistant) message lists. `build_reward`
turns a recipe/CLI spec into a reward; `as_trl_reward_func` adapts any reward to TRL's GRPO/RLOO signature.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from stages.core.errors import ConfigError


@runtime_checkable
class RewardFunction(Protocol):
    def score(self, prompts: list, responses: list) -> list[float]: ...


# -- normalisation ---------------------------------------------------------------------------------
def as_messages(x, role: str = "user") -> list[dict]:
    """A string becomes one message of `role`; a message list (or one message dict) is copied."""
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, dict):
        return [dict(x)]
    return [dict(m) for m in x]


def prompt_text(prompt) -> str:
    """The last user message's content (the whole string for a plain prompt)."""
    if isinstance(prompt, str):
        return prompt
    msgs = as_messages(prompt)
    users = [m for m in msgs if m.get("role") == "user"] or msgs
    return str(users[-1].get("content", "")) if users else ""


def response_text(response) -> str:
    """The reply's text: the string itself, or the contents of its (assistant) messages joined."""
    if isinstance(response, str):
        return response
    return "".join(str(m.get("content", "")) for m in as_messages(response, role="assistant"))


def _check_pair(prompts, responses):
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return prompts, responses


class _PerPair:
    """Base for rewards computed one pair at a time from plain text."""

    def score(self, prompts, responses) -> list[float]:
        prompts, responses = _check_pair(prompts, responses)
        return [float(self.score_one(prompt_text(p), response_text(r))) for p, r in zip(prompts, responses)]

    def score_one(self, prompt: str, response: str) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


# -- rules -----------------------------------------------------------------------------------------
class RegexReward(_PerPair):
    """`reward` if the pattern is found in the response (searched, or fully matched), else `penalty`."""

    def __init__(self, pattern: str, reward: float = 1.0, penalty: float = 0.0, *, flags: int = 0, fullmatch: bool = False):
        try:
            self.regex = re.compile(pattern, flags)
        except (re.error, TypeError) as e:
            raise ConfigError(f"regex {pattern!r}: {e}") from None
        self.reward, self.penalty, self.fullmatch = float(reward), float(penalty), fullmatch

    def score_one(self, prompt, response):
        hit = (self.regex.fullmatch if self.fullmatch else self.regex.search)(response)
        return self.reward if hit else self.penalty


class LengthPenalty(_PerPair):
    """Non-positive length penalty.

    target_words: -scale * |words - target| / target.  max_tokens: -scale * max(0, n - max) / max, with n
    counted by `tokenizer` if given, else by whitespace words.
    """

    def __init__(self, target_words: int | None = None, max_tokens: int | None = None, scale: float = 1.0, tokenizer=None):
        if (target_words is None) == (max_tokens is None):
            raise ConfigError("length penalty: give exactly one of target_words or max_tokens")
        n = target_words if target_words is not None else max_tokens
        if not isinstance(n, int) or n <= 0:
            raise ConfigError(f"length penalty: the limit must be a positive integer, got {n!r}")
        self.target_words, self.max_tokens, self.scale, self.tokenizer = target_words, max_tokens, float(scale), tokenizer

    def score_one(self, prompt, response):
        if self.target_words is not None:
            return -self.scale * abs(len(response.split()) - self.target_words) / self.target_words
        n = (len(self.tokenizer(response, add_special_tokens=False)["input_ids"]) if self.tokenizer is not None
             else len(response.split()))
        return -self.scale * max(0, n - self.max_tokens) / self.max_tokens


class FormatReward(_PerPair):
    """Format checks on the response; `reward` if all pass, else `penalty` (partial=True: interpolate by fraction)."""

    def __init__(self, *, starts_with: str | None = None, ends_with: str | None = None, required=(), forbidden=(),
                 lowercase: bool = False, strip: bool = True, reward: float = 1.0, penalty: float = 0.0,
                 partial: bool = False):
        if isinstance(required, str) or isinstance(forbidden, str):
            raise ConfigError("format reward: 'required' and 'forbidden' are lists of strings")
        self.starts_with, self.ends_with, self.lowercase, self.strip = starts_with, ends_with, lowercase, strip
        self.required, self.forbidden = list(required), list(forbidden)
        self.reward, self.penalty, self.partial = float(reward), float(penalty), partial
        if not (starts_with or ends_with or self.required or self.forbidden or lowercase):
            raise ConfigError("format reward: no checks given")

    def checks(self, response: str) -> dict[str, bool]:
        text = response.strip() if self.strip else response
        out = {}
        if self.starts_with:
            out["starts_with"] = text.startswith(self.starts_with)
        if self.ends_with:
            out["ends_with"] = text.endswith(self.ends_with)
        for k in self.required:
            out[f"required:{k}"] = k.lower() in text.lower()
        for k in self.forbidden:
            out[f"forbidden:{k}"] = k.lower() not in text.lower()
        if self.lowercase:
            out["lowercase"] = text == text.lower()
        return out

    def score_one(self, prompt, response):
        c = self.checks(response)
        frac = sum(c.values()) / len(c)
        if self.partial:
            return self.penalty + (self.reward - self.penalty) * frac
        return self.reward if frac == 1.0 else self.penalty


class VerifierReward(_PerPair):
    """Wraps `fn(prompt_text, response) -> bool | float | obj with .passed`; booleans map to reward/penalty."""

    def __init__(self, fn: Callable, reward: float = 1.0, penalty: float = 0.0):
        if not callable(fn):
            raise ConfigError(f"verifier: {fn!r} is not callable")
        self.fn, self.reward, self.penalty = fn, float(reward), float(penalty)

    def score_one(self, prompt, response):
        v = self.fn(prompt, response)
        if hasattr(v, "passed"):
            v = bool(v.passed)
        if isinstance(v, bool):
            return self.reward if v else self.penalty
        return float(v)


def _demo_verify(prompt: str, response: str):
    try:
        from stages.core.demo import verify
    except ImportError as e:
        raise ConfigError(f"demo_verifier: the demo data module is not available ({e})") from None
    return verify(prompt, response)


def _demo_checks_passed(prompt: str, response: str) -> float:
    checks = _demo_verify(prompt, response).checks
    return sum(checks.values()) / len(checks) if checks else 0.0


def demo_verifier_reward(reward: float = 1.0, penalty: float = 0.0, partial: bool = False) -> VerifierReward:
    """1.0 when `stages.core.demo.verify` passes the response, else 0.0 (the module is imported on first use).
    `partial: true` scores the fraction of the prompt's checks passed instead: a dense signal for RL, where
    an all-or-nothing pass is rarely hit by early samples."""
    if not isinstance(partial, bool):
        raise ConfigError(f"demo_verifier: partial must be true or false, got {partial!r}")
    return VerifierReward(_demo_checks_passed if partial else _demo_verify, reward=reward, penalty=penalty)


class CombinedReward:
    """Weighted sum of rewards: CombinedReward([(reward, weight), ...]) (a bare reward has weight 1)."""

    def __init__(self, parts):
        self.parts = []
        for i, part in enumerate(parts):
            r, w = part if isinstance(part, tuple) else (part, 1.0)
            if not isinstance(r, RewardFunction):
                raise ConfigError(f"reward[{i}]: {r!r} has no .score(prompts, responses) method")
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise ConfigError(f"reward[{i}]: weight must be a number, got {w!r}")
            self.parts.append((r, float(w)))
        if not self.parts:
            raise ConfigError("combined reward: no parts")

    def score(self, prompts, responses) -> list[float]:
        prompts, responses = _check_pair(prompts, responses)
        total = [0.0] * len(prompts)
        for r, w in self.parts:
            for j, v in enumerate(r.score(prompts, responses)):
                total[j] += w * v
        return total


# -- TRL adapter -----------------------------------------------------------------------------------
class TrlRewardFunc:
    """A picklable callable with TRL's reward-function signature; TRL logs it under `__name__`."""

    def __init__(self, reward: RewardFunction, name: str | None = None):
        self.reward = reward
        self.__name__ = name or type(reward).__name__

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return [float(v) for v in self.reward.score(list(prompts), list(completions))]


def as_trl_reward_func(reward: RewardFunction, name: str | None = None) -> TrlRewardFunc:
    """For GRPOTrainer/RLOOTrainer(reward_funcs=[...]): called as f(prompts=, completions=, completion_ids=, **columns)."""
    if not isinstance(reward, RewardFunction):
        raise ConfigError(f"{reward!r} has no .score(prompts, responses) method")
    return TrlRewardFunc(reward, name)


# -- specs -----------------------------------------------------------------------------------------
KINDS = ("model", "demo_verifier", "regex", "length", "format", "verifier")
SPEC_HELP = ("a reward model dir, 'demo_verifier', a JSON/YAML file or inline JSON, a dict with one of "
             f"{', '.join(KINDS)} (+ 'weight'), or a list of these")


def _import_callable(ref: str, where: str):
    mod, _, attr = str(ref).partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{where}: cannot import verifier {ref!r} (expected 'module:function'): {e}") from None


def _from_string(spec: str, where: str):
    s = spec.strip()
    if s == "demo_verifier":
        return demo_verifier_reward()
    if s[:1] in "[{":
        try:
            return build_reward(json.loads(s), _where=where)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: invalid inline JSON reward spec: {e}") from None
    p = Path(s).expanduser()
    if p.is_dir():
        if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
            raise ConfigError(f"{where}: directory {s!r} holds no model (no config.json or adapter_config.json)")
        from .model import load_reward_model

        return load_reward_model(p)
    if p.is_file() and p.suffix in (".json", ".yaml", ".yml"):
        import yaml

        try:
            return build_reward(yaml.safe_load(p.read_text(encoding="utf-8")), _where=f"{where} ({s})")
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: cannot parse {s}: {e}") from None
    raise ConfigError(f"{where}: unknown reward spec {spec!r}; expected {SPEC_HELP}")


def _from_dict(spec: dict, where: str):
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: {spec!r} must have exactly one of {', '.join(KINDS)}")
    kind, value = kinds[0], spec[kinds[0]]
    opts = {k: v for k, v in spec.items() if k not in (kind, "weight")}
    try:
        if kind == "model":
            from .model import load_reward_model

            return load_reward_model(value, **opts)
        if kind == "demo_verifier":
            return demo_verifier_reward(**opts)
        if kind == "regex":
            return RegexReward(value, **opts)
        if kind == "verifier":
            return VerifierReward(_import_callable(value, where) if isinstance(value, str) else value, **opts)
        kwargs = dict(value or {}) if isinstance(value, dict) or value is None else None
        if kwargs is None:
            raise ConfigError(f"{kind} takes a mapping of options, got {value!r}")
        return (LengthPenalty if kind == "length" else FormatReward)(**kwargs, **opts)
    except TypeError as e:
        raise ConfigError(f"{where}: {spec!r}: {e}") from None
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _weight(spec, where: str) -> float:
    w = spec.get("weight", 1.0) if isinstance(spec, dict) else 1.0
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise ConfigError(f"{where}: weight must be a number, got {w!r}")
    return float(w)


def build_reward(spec, *, _where: str = "reward"):
    """A reward from a spec (see SPEC_HELP); a list builds a CombinedReward. Bad entries raise ConfigError."""
    if isinstance(spec, RewardFunction):
        return spec
    if isinstance(spec, str):
        return _from_string(spec, _where)
    if isinstance(spec, dict):
        r, w = _from_dict(spec, _where), _weight(spec, _where)
        return r if w == 1.0 else CombinedReward([(r, w)])
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"{_where}: empty list of rewards")
        parts = []
        for i, entry in enumerate(spec):
            where = f"{_where}[{i}]"
            if isinstance(entry, dict) and "weight" in entry:
                parts.append((_from_dict(entry, where), _weight(entry, where)))
            else:
                parts.append((build_reward(entry, _where=where), 1.0))
        return CombinedReward(parts)
    raise ConfigError(f"{_where}: unsupported reward spec {spec!r}; expected {SPEC_HELP}")
