"""Dataset row formats: detect a source's format and convert one row to canonical form.

Pure functions, no I/O. Every task's canonical row is built from conversational messages
(``{"role", "content"}`` with role in system|user|assistant):

- ``sft``: ``{"messages": [...]}`` (optional system, then user/assistant alternating from user,
  ending with an assistant turn).
- ``preference``: ``{"prompt": [... user], "chosen": [assistant], "rejected": [assistant]}``
  plus ``"margin"`` (float) when the row has a margin.
- ``unpaired``: ``{"prompt": [...], "completion": [assistant], "label": bool}`` (KTO); a
  preference row gives two rows (chosen → True, rejected → False).
- ``prompt``: ``{"prompt": [... user]}`` (a conversation drops its final assistant turn).

Feedback rows (a conversation or prompt/completion rated by a boolean ``label``/``kto_tag`` or a
number ``rating``/``score``) rate the final assistant turn; everything before it is the prompt. For
``unpaired`` a rating becomes a label by threshold (``rating >= threshold``); for ``preference``
``convert_row`` returns one ``{"prompt", "completion", "rating"}`` row and ``pair_ratings`` (which
needs every row of a source) pairs completions of the same prompt.

A ``meta`` column passes through unchanged; other unknown columns are ignored. Problems in a
row raise ``RowError`` (a ``DataError`` with a machine-readable ``reason``).
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Iterable, Mapping

from .errors import ConfigError, DataError
from .ratings import MISSING_WORDS, boolean, check_rating_settings, number, pair_ratings  # noqa: F401 (re-exported)

TASKS = ("sft", "preference", "unpaired", "prompt")
ROLES = ("system", "user", "assistant")
BUILTIN_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                 "gpt": "assistant", "bot": "assistant", "model": "assistant"}

# format name -> required columns, in detection order (most specific first).
FORMATS: dict[str, tuple[str, ...]] = {
    "messages_label": ("messages", "label"),  # feedback: last assistant turn rated by a boolean
    "sharegpt_label": ("conversations", "label"),
    "messages_rating": ("messages", "rating"),  # feedback: last assistant turn rated by a number
    "sharegpt_rating": ("conversations", "rating"),
    "prompt_completion_rating": ("prompt", "completion", "rating"),
    "messages": ("messages",),
    "sharegpt_preference": ("conversations", "chosen", "rejected"),
    "sharegpt": ("conversations",),
    "preference": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),  # "\n\nHuman: ...\n\nAssistant: ..." transcripts
    "implicit_preference": ("chosen", "rejected"),  # full conversations sharing a prefix
    "unpaired": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "prompt_only": ("prompt",),
}
_KIND = {"messages": "conv", "sharegpt": "conv", "alpaca": "conv", "prompt_completion": "conv",
         "preference": "pair", "implicit_preference": "pair", "hh": "pair",
         "sharegpt_preference": "pair", "unpaired": "unpaired", "prompt_only": "prompt",
         "messages_label": "feedback", "sharegpt_label": "feedback", "messages_rating": "feedback",
         "sharegpt_rating": "feedback", "prompt_completion_rating": "feedback"}
# which row kinds can feed which task
_TASK_KINDS = {"sft": ("conv", "pair"), "preference": ("pair", "feedback"), "unpaired": ("unpaired", "pair", "feedback"),
               "prompt": ("conv", "pair", "unpaired", "prompt", "feedback")}
MAPPABLE = ("messages", "conversations", "prompt", "completion", "chosen", "rejected", "label", "rating",
            "margin", "meta", "instruction", "input", "output", "system", "role", "content")
# other common names of a canonical column, used when the canonical one is absent
ALIASES = {"kto_tag": "label", "score": "rating"}
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


class RowError(DataError):
    """One invalid row; ``reason`` is a short key used to count drops."""

    def __init__(self, message: str, *, reason: str, source=None, row=None, field=None):
        self.reason = reason
        super().__init__(message, source=source, row=row, field=field)


class _Bad(Exception):
    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


def suggest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_mappings(column_mapping: Mapping | None, role_mapping: Mapping | None) -> None:
    """Raise ConfigError for unknown column_mapping keys or role_mapping targets."""
    for key, value in (column_mapping or {}).items():
        if key not in MAPPABLE:
            hint = f" (reversed? did you mean {{'{value}': '{key}'}})" if value in MAPPABLE else suggest(key, MAPPABLE)
            raise ConfigError(f"column_mapping key '{key}' is not a canonical field{hint}; "
                              f"keys are canonical fields ({', '.join(MAPPABLE)}), values are your column names")
    for src, dst in (role_mapping or {}).items():
        if dst not in ROLES:
            raise ConfigError(f"role_mapping maps '{src}' to '{dst}', which is not one of {', '.join(ROLES)}")


def map_columns(row: Mapping, column_mapping: Mapping | None) -> dict:
    """Rename columns: ``column_mapping`` maps canonical field -> source column; ``ALIASES``
    (``kto_tag``, ``score``) stand in for a canonical column the row lacks."""
    mapping = {k: v for k, v in (column_mapping or {}).items() if k not in ("role", "content")}
    out = {k: v for k, v in row.items() if k not in mapping.values()}
    out.update({canon: row[src] for canon, src in mapping.items() if src in row})
    for alias, canon in ALIASES.items():
        # an explicit boolean `label` wins: a `score` beside it is then not a rating to threshold
        if canon not in out and alias in out and not (canon == "rating" and "label" in out):
            out[canon] = out.pop(alias)
    return out


def kind(fmt: str) -> str:
    """The row kind of a format: conv, pair, unpaired, prompt or feedback."""
    return _KIND[fmt]


def detect_format(columns: Iterable[str], sample: Mapping | None = None, *, column_mapping=None,
                  source: str | None = None, task: str | None = None) -> str:
    """Name of the format whose columns are present (after ``column_mapping``).

    ``sample`` (a row) tells Anthropic-HH strings from implicit-prompt message lists. For the ``sft``
    and ``prompt`` tasks, which have no use for a label or rating, feedback formats give way to the
    next match (rated conversations read as plain conversations)."""
    raw = list(columns)
    cols = set(map_columns(dict.fromkeys(raw), column_mapping))
    for name, required in FORMATS.items():
        if not set(required) <= cols:
            continue
        if task in ("sft", "prompt") and _KIND[name] == "feedback":
            continue
        if name in ("hh", "implicit_preference") and sample is not None:
            chosen = map_columns(sample, column_mapping).get("chosen")
            if (name == "hh") != isinstance(chosen, str):
                continue
        return name
    expected = "; ".join(f"{n}: {'+'.join(r)}" for n, r in FORMATS.items())
    raise DataError(f"no known dataset format matches columns {sorted(raw)}. Expected one of: {expected}. "
                    "Use column_mapping (canonical field -> your column, e.g. {\"prompt\": \"question\"}) "
                    "or set format explicitly.", source=source)


def check_task(fmt: str, task: str, *, source: str | None = None) -> None:
    """Raise if rows of format ``fmt`` cannot feed ``task`` (or either name is unknown)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'{suggest(task, TASKS)}; expected one of {', '.join(TASKS)}")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown data format '{fmt}'{suggest(fmt, FORMATS)}; expected 'auto' or one of "
                          f"{', '.join(FORMATS)}")
    if _KIND[fmt] not in _TASK_KINDS[task]:
        fits = [f for f in FORMATS if _KIND[f] in _TASK_KINDS[task]]
        raise DataError(f"format '{fmt}' cannot be used for task '{task}'; formats that fit: {', '.join(fits)}",
                        source=source)


def convert_row(row: Mapping, *, task: str, fmt: str, column_mapping=None, role_mapping=None,
                source: str | None = None, index: int | None = None, rating_scale=None,
                rating_threshold=None) -> list[dict]:
    """Convert one raw row to canonical rows for ``task`` (one row; two for pair → unpaired).

    Feedback rows for ``preference`` come back as ``{"prompt", "completion", "rating"}`` rows for
    ``pair_ratings``. Raises ``RowError`` naming ``source``, row ``index`` and the offending field."""
    check_task(fmt, task, source=source)
    row = map_columns(row, column_mapping)
    keys = {k: (column_mapping or {}).get(k) for k in ("role", "content")}
    try:
        parsed = _parse(fmt, row, dict(role_mapping or {}), keys)
        if parsed[0] == "feedback":
            parsed = _feedback(parsed, task, rating_scale, rating_threshold)
        out = _to_task(parsed, task)
    except _Bad as e:
        raise RowError(e.message, reason=e.reason, source=source, row=index, field=e.field) from None
    if row.get("meta") is not None:
        for r in out:
            r["meta"] = row["meta"]
    return out


# ---------------------------------------------------------------- parsing a row


def _get(row: Mapping, col: str) -> Any:
    value = row.get(col)
    if value is None:
        raise _Bad("missing_field", col, f"missing field '{col}'")
    return value


def _content(value: Any, field: str, reason: str = "empty_content") -> str:
    if value is None:
        raise _Bad(reason, field, "content is missing")
    if not isinstance(value, str):
        raise _Bad("non_string_content", field, f"content must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Bad(reason, field, "content is empty")
    return value


def _role(raw: Any, field: str, role_mapping: dict) -> str:
    if isinstance(raw, str):
        for key in (raw, raw.lower()):
            if key in role_mapping:
                return role_mapping[key]
        if raw.lower() in BUILTIN_ROLES:
            return BUILTIN_ROLES[raw.lower()]
    raise _Bad("invalid_role", field, f"unknown role {raw!r}; expected one of {', '.join(BUILTIN_ROLES)} "
                                      "or a role_mapping entry")


def _message(m: Any, field: str, rm: dict, keys: dict) -> dict:
    if not isinstance(m, Mapping):
        raise _Bad("invalid_message", field, f"expected a message object with role and content, got "
                                             f"{type(m).__name__}")
    rk = next((k for k in (keys.get("role"), "role", "from") if k and k in m), None)
    ck = next((k for k in (keys.get("content"), "content", "value") if k and k in m), None)
    if rk is None:
        raise _Bad("missing_field", f"{field}.role", "message has no 'role' (or 'from')")
    if ck is None:
        raise _Bad("missing_field", f"{field}.content", "message has no 'content' (or 'value')")
    return {"role": _role(m[rk], f"{field}.role", rm), "content": _content(m[ck], f"{field}.content")}


def _messages(value: Any, field: str, rm: dict, keys: dict) -> list[dict]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _Bad("invalid_message", field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise _Bad("missing_field", field, "message list is empty")
    return [_message(m, f"{field}[{i}]", rm, keys) for i, m in enumerate(value)]


def _text_or_messages(value: Any, field: str, role: str, rm: dict, keys: dict) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": _content(value, field)}]
    return _messages(value, field, rm, keys)


def _check_order(msgs: list[dict], field: str, *, end: str) -> None:
    start = 1 if msgs and msgs[0]["role"] == "system" else 0
    for j in range(start, len(msgs)):
        expected = "user" if (j - start) % 2 == 0 else "assistant"
        if msgs[j]["role"] != expected:
            raise _Bad("role_order", f"{field}[{j}].role",
                       f"expected a '{expected}' turn, got '{msgs[j]['role']}' (roles must be: optional "
                       "system first, then user/assistant alternating, starting with user)")
    if len(msgs) == start:
        raise _Bad("missing_field", field, "conversation has no user turn")
    if end == "assistant" and len(msgs) - start < 2:
        raise _Bad("no_assistant_turn", field, "conversation has no assistant turn")
    if msgs[-1]["role"] != end:
        what = ("ends with a user turn; an SFT conversation must end with an assistant turn"
                if end == "assistant" else "must end with a user turn")
        raise _Bad("role_order", f"{field}[{len(msgs) - 1}].role", what)


def _response(value: Any, field: str, prompt: list[dict], rm: dict, keys: dict) -> list[dict]:
    """One assistant turn; a message list that repeats the prompt first has it stripped."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _content(value, field, "empty_response")}]
    try:
        msgs = _messages(value, field, rm, keys)
    except _Bad as e:
        raise _Bad("empty_response" if e.reason == "empty_content" else e.reason, e.field, e.message) from None
    if len(msgs) > len(prompt) and msgs[:len(prompt)] == prompt:
        msgs = msgs[len(prompt):]
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _Bad("invalid_response", field, f"expected a single assistant turn, got roles "
                                              f"{[m['role'] for m in msgs]}")
    return msgs


def _split_pair(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Shared leading messages become the prompt (as TRL's extract_prompt)."""
    if chosen == rejected:
        raise _Bad("identical_pair", "rejected", "chosen and rejected are identical")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    for name, rest in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
        if not rest:
            raise _Bad("empty_response", name, f"{name} has no turn after the shared prompt")
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            raise _Bad("invalid_response", name, f"{name} must differ from the other response only in its "
                                                 f"final assistant turn (after the shared prompt: roles "
                                                 f"{[m['role'] for m in rest]})")
    return chosen[:n], chosen[n:], rejected[n:]


def _parse_hh(text: Any, field: str) -> list[dict]:
    if not isinstance(text, str):
        raise _Bad("non_string_content", field, f"expected a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript "
                                                f"string, got {type(text).__name__}")
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        raise _Bad("invalid_transcript", field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    if parts[0].strip():
        raise _Bad("invalid_transcript", field, "text before the first 'Human:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _margin(row: Mapping) -> float | None:
    value = row.get("margin")
    if value is None or (isinstance(value, float) and math.isnan(value)):  # Parquet/pandas write a missing float as NaN
        return None
    if isinstance(value, str) and value.strip().lower() in MISSING_WORDS:  # a CSV cell: spreadsheets and R write these
        return None
    margin = number(value)
    if margin is None or not math.isfinite(margin):
        raise _Bad("invalid_value", "margin", f"margin must be a finite number, got {value!r}")
    return margin


def _parse(fmt: str, row: Mapping, rm: dict, keys: dict) -> tuple:
    """Return ("conv", msgs, field) | ("pair", prompt, chosen, rejected, margin)
    | ("unpaired", prompt, completion, label) | ("prompt", prompt)."""
    if fmt in ("messages", "sharegpt"):
        col = "messages" if fmt == "messages" else "conversations"
        return "conv", _messages(_get(row, col), col, rm, keys), col
    if fmt == "alpaca":
        instruction = _content(_get(row, "instruction"), "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _Bad("non_string_content", "input", f"input must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": _content(_get(row, "output"), "output", "empty_response")}]
        system = row.get("system")
        if system is not None and (not isinstance(system, str) or system.strip()):
            msgs.insert(0, {"role": "system", "content": _content(system, "system")})
        return "conv", msgs, "messages"
    if fmt == "prompt_only":
        return "prompt", _text_or_messages(_get(row, "prompt"), "prompt", "user", rm, keys)
    if fmt == "hh":
        chosen, rejected = _parse_hh(_get(row, "chosen"), "chosen"), _parse_hh(_get(row, "rejected"), "rejected")
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            for i, m in enumerate(msgs):
                if not m["content"]:
                    last = i == len(msgs) - 1 and m["role"] == "assistant"
                    raise _Bad("empty_response" if last else "empty_content", name,
                               f"{'final Assistant' if last else f'turn {i}'} of the transcript is empty")
        prompt, chosen, rejected = _split_pair(chosen, rejected)
        _check_order(prompt, "chosen", end="user")
        return "pair", prompt, chosen, rejected, _margin(row)
    if fmt == "implicit_preference":
        chosen = _messages(_get(row, "chosen"), "chosen", rm, keys)
        rejected = _messages(_get(row, "rejected"), "rejected", rm, keys)
        prompt, chosen, rejected = _split_pair(chosen, rejected)
        _check_order(prompt, "chosen", end="user")
        return "pair", prompt, chosen, rejected, _margin(row)
    if fmt in ("preference", "sharegpt_preference"):
        col = "prompt" if fmt == "preference" else "conversations"
        prompt = _text_or_messages(_get(row, col), col, "user", rm, keys)
        chosen = _response(_get(row, "chosen"), "chosen", prompt, rm, keys)
        rejected = _response(_get(row, "rejected"), "rejected", prompt, rm, keys)
        if chosen == rejected:
            raise _Bad("identical_pair", "rejected", "chosen and rejected are identical")
        _check_order(prompt, col, end="user")
        return "pair", prompt, chosen, rejected, _margin(row)
    if _KIND[fmt] == "feedback":
        return _parse_feedback(fmt, row, rm, keys)
    prompt = _text_or_messages(_get(row, "prompt"), "prompt", "user", rm, keys)
    if fmt == "unpaired":
        label = boolean(_get(row, "label"))
        if not isinstance(label, bool):
            raise _Bad("invalid_label", "label", f"label must be a boolean (true/false), got {label!r} "
                                                 f"({type(label).__name__})")
        return "unpaired", prompt, _response(_get(row, "completion"), "completion", prompt, rm, keys), label
    completion = _text_or_messages(_get(row, "completion"), "completion", "assistant", rm, keys)
    return "conv", prompt + completion, "prompt"  # prompt_completion


def _parse_feedback(fmt: str, row: Mapping, rm: dict, keys: dict) -> tuple:
    """("feedback", prompt, completion, field, value): the final assistant turn and its label or rating."""
    if fmt == "prompt_completion_rating":
        prompt = _text_or_messages(_get(row, "prompt"), "prompt", "user", rm, keys)
        completion = _response(_get(row, "completion"), "completion", prompt, rm, keys)
    else:
        col = "conversations" if fmt.startswith("sharegpt") else "messages"
        msgs = _messages(_get(row, col), col, rm, keys)
        if msgs[-1]["role"] != "assistant":
            raise _Bad("no_assistant_turn", f"{col}[{len(msgs) - 1}].role",
                       "the last turn must be the assistant turn the feedback rates")
        prompt, completion = msgs[:-1], msgs[-1:]
        _check_order(prompt, col, end="user")
    field = "label" if fmt.endswith("_label") else "rating"
    value = _get(row, field)
    if field == "label":
        value = boolean(value)
    elif isinstance(value, str) and number(value) is not None:  # the text of a number: a CSV cell
        value = number(value)
    if field == "label" and not isinstance(value, bool):
        raise _Bad("invalid_label", "label", f"label must be a boolean (true/false), got {value!r} "
                                             f"({type(value).__name__})")
    if field == "rating" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise _Bad("invalid_rating", "rating", f"rating must be a finite number, got {value!r} ({type(value).__name__})")
    return "feedback", prompt, completion, field, value


def _feedback(parsed: tuple, task: str, scale, threshold) -> tuple:
    """A feedback row for ``task``: a label (rating >= threshold) for unpaired, a rated row to pair."""
    _, prompt, completion, field, value = parsed
    if task == "prompt":
        return "prompt", prompt
    if field == "rating":
        value = float(value)
        if scale is not None and not scale[0] <= value <= scale[1]:
            raise _Bad("rating_out_of_scale", "rating", f"rating {value:g} is outside rating_scale "
                                                        f"[{scale[0]:g}, {scale[1]:g}]")
        if task == "unpaired":
            if threshold is None and scale is None and not 0 <= value <= 1:
                raise _Bad("rating_out_of_scale", "rating",
                           f"rating {value:g} is outside the default scale [0, 1] (threshold 0.5); set "
                           "rating_scale: [lowest, highest] (threshold at its middle) or rating_threshold")
            if threshold is None:
                threshold = (scale[0] + scale[1]) / 2 if scale is not None else 0.5
            return "unpaired", prompt, completion, value >= threshold
    elif task == "unpaired":
        return "unpaired", prompt, completion, value
    return "rated", prompt, completion, field, value


def _to_task(parsed: tuple, task: str) -> list[dict]:
    kind = parsed[0]
    if kind == "rated":
        _, prompt, completion, field, value = parsed
        _check_order(prompt, "prompt", end="user")
        return [{"prompt": prompt, "completion": completion, field: value}]
    if kind == "conv":
        msgs, field = parsed[1], parsed[2]
        if task == "sft":
            _check_order(msgs, field, end="assistant")
            return [{"messages": msgs}]
        prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        _check_order(prompt, field, end="user")
        return [{"prompt": prompt}]
    if kind == "pair":
        prompt, chosen, rejected, margin = parsed[1:]
        _check_order(prompt, "prompt", end="user")
        if task == "sft":
            return [{"messages": prompt + chosen}]
        if task == "prompt":
            return [{"prompt": prompt}]
        if task == "unpaired":
            return [{"prompt": prompt, "completion": chosen, "label": True},
                    {"prompt": prompt, "completion": rejected, "label": False}]
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if margin is not None:
            out["margin"] = margin
        return [out]
    _check_order(parsed[1], "prompt", end="user")
    if kind == "unpaired" and task == "unpaired":
        return [{"prompt": parsed[1], "completion": parsed[2], "label": parsed[3]}]
    return [{"prompt": parsed[1]}]
