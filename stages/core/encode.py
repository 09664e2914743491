"""Tokenisation with loss masks and the suite's one truncation rule.

Rule for rows longer than `max_length` (`on_long: truncate`, the default): keep the final assistant
response whole and trim tokens from the *start* of the conversation; only when the final response
does not fit next to at least one prompt token is the response cut at its end (keeping the last
quarter of `max_length` of prompt, at least one token). `fit_prompt_response` is that rule; SFT, RM,
DPO/KTO encoding and reward scoring all call it. `on_long: drop` drops such rows, `error` stops.
Every truncation and drop is counted and reported, never silent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DataError


@dataclass
class LengthReport:
    """What happened to long rows in one split."""

    rows: int = 0
    over_limit: int = 0
    prompt_trimmed: int = 0
    response_cut: int = 0
    dropped: int = 0
    max_tokens_seen: int = 0
    examples: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def keep(self, n_tokens: int, max_length: int | None, on_long: str, *, source: str, row: int, field: str) -> bool:
        """Count a row; False when `on_long: drop` drops it, DataError when `on_long: error`."""
        self.rows += 1
        self.max_tokens_seen = max(self.max_tokens_seen, n_tokens)
        if max_length is None or n_tokens <= max_length or on_long == "truncate":
            return True
        if on_long == "error":
            raise DataError(f"{n_tokens} tokens, over max_length={max_length} (set on_long: truncate or drop)",
                            source=source, row=row, field=field)
        self.over_limit += 1
        self.dropped += 1
        if len(self.examples) < 5:
            self.examples.append({"row": row, "tokens": n_tokens})
        return False

    def summary(self, name: str) -> str:
        return (f"{name}: {self.rows} rows, {self.over_limit} over the length limit "
                f"({self.prompt_trimmed} prompt-trimmed, {self.response_cut} response-cut, {self.dropped} dropped)")


def render_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation with the chat template; return text and char spans of assistant turns.

    Each span starts after the generation prompt of that turn and ends where the next message begins
    (so the end-of-turn token is trained, which teaches the model to stop).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(upto) or not upto.startswith(head):
            raise ValueError("chat template is not prefix-consistent")
        end = len(upto.rstrip()) if i == len(messages) - 1 else len(upto)
        spans.append((len(head), end))
    return text, spans


def fit_prompt_response(prompt_ids, response_ids, max_length: int):
    """The suite's truncation rule for one prompt + response: returns (prompt, response, what).

    `what` is None (fits), "prompt_trimmed" (prompt cut from its start, response whole) or
    "response_cut" (the response would leave no prompt token: keep the prompt's last
    max(1, max_length // 4) tokens and cut the response's end). Works on any sequences, so callers
    can pass (token, label) pairs.
    """
    prompt, response = list(prompt_ids), list(response_ids)
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if len(prompt) + len(response) <= max_length:
        return prompt, response, None
    if len(response) <= max_length - 1:  # at least one prompt token stays as context
        return prompt[len(prompt) + len(response) - max_length:], response, "prompt_trimmed"
    keep = min(len(prompt), max(1, max_length // 4)) if max_length > 1 else 0
    return prompt[len(prompt) - keep:], response[: max_length - keep], "response_cut"


def _count(report: LengthReport, what: str | None) -> None:
    if what is not None:
        report.over_limit += 1
        setattr(report, what, getattr(report, what) + 1)


def _fit(ids: list[int], labels: list[int], last_start: int, max_length: int, report: LengthReport):
    """Apply the truncation rule to one encoded row; `last_start` = first token of the final response."""
    rows = list(zip(ids, labels))
    prompt, response, what = fit_prompt_response(rows[:last_start], rows[last_start:], max_length)
    _count(report, what)
    kept = prompt + response
    return [t for t, _ in kept], [lab for _, lab in kept]


def encode_sft(dataset, tokenizer, *, max_length: int | None, loss_on: str = "assistant", on_long: str = "truncate",
               source: str = "train"):
    """Messages rows → input_ids/labels (-100 outside the trained tokens). Returns (Dataset, LengthReport)."""
    from datasets import Dataset

    report = LengthReport()
    out = {"input_ids": [], "labels": []}
    for row_idx, row in enumerate(dataset):
        messages = row["messages"]
        try:
            ids, labels, last_start = encode_conversation(messages, tokenizer, loss_on=loss_on)
        except ValueError:
            raise DataError("the chat template renders earlier turns differently once later turns are added; "
                            "set a prefix-consistent chat_template", source=source, row=row_idx, field="messages") from None
        if not report.keep(len(ids), max_length, on_long, source=source, row=row_idx, field="messages"):
            continue
        if max_length is not None and len(ids) > max_length:
            ids, labels = _fit(ids, labels, last_start, max_length, report)
        if all(x == -100 for x in labels):
            report.dropped += 1
            continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return Dataset.from_dict(out), report


def encode_conversation(messages: list[dict], tokenizer, *, loss_on: str = "assistant"):
    """One conversation → (input_ids, labels, index of the final response's first token)."""
    text, spans = render_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if loss_on == "last":
        spans = spans[-1:]
    labels = [t if loss_on == "all" or any(s <= a < e for s, e in spans) else -100 for t, (a, _) in zip(ids, offsets)]
    last_start = len(ids)
    if spans:
        last_start = next((j for j, (a, _) in enumerate(offsets) if a >= spans[-1][0]), len(ids))
    return ids, labels, last_start


def _fit_split(prompt: list[int], responses: list[list[int]], max_length: int, report: LengthReport):
    """The truncation rule for one prompt shared by several responses: fitted to the longest, so every
    response is read after the same context."""
    longest = max(responses, key=len)
    prompt, _, what = fit_prompt_response(prompt, longest, max_length)
    _count(report, what)
    return prompt, [r[: max_length - len(prompt)] for r in responses]


def encode_preference(dataset, tokenizer, *, max_length: int | None, on_long: str = "truncate", source: str = "train",
                      layout: str = "pair"):
    """Preference rows → token ids under the suite's truncation rule.

    layout "pair": chosen_ids/rejected_ids, full sequences (RewardTrainer); layout "dpo": prompt_ids
    plus chosen_ids/rejected_ids holding only the responses (DPOTrainer). TRL drops or cuts long
    pairs silently; here they are truncated (prompt head trimmed, responses kept) or dropped/refused
    by `on_long`, and counted either way. Both layouts trim the prompt once, for the longer
    response, so chosen and rejected are always judged after the same context.
    """
    from datasets import Dataset

    report = LengthReport()
    out: dict[str, list] = {"chosen_ids": [], "rejected_ids": []}
    keys = ("chosen", "rejected") if "chosen" in dataset.column_names else ("completion",)
    if keys == ("completion",):  # unpaired (KTO): prompt_ids, completion_ids, label
        if layout != "dpo":
            raise ValueError("unpaired rows need layout='dpo'")
        out = {"prompt_ids": [], "completion_ids": [], "label": []}
    elif layout == "dpo":
        out["prompt_ids"] = []
    has_margin = "margin" in dataset.column_names
    if has_margin:
        out["margin"] = []
    for row_idx, row in enumerate(dataset):
        pair = []
        try:
            for key in keys:
                ids, labels, start = encode_conversation(row["prompt"] + row[key], tokenizer, loss_on="last")
                pair.append((ids, labels, start))
        except ValueError:
            raise DataError("the chat template is not prefix-consistent; set chat_template", source=source,
                            row=row_idx, field="prompt") from None
        longest = max(len(p[0]) for p in pair)
        if not report.keep(longest, max_length, on_long, source=source, row=row_idx, field="/".join(keys)):
            continue
        if layout == "dpo" or (max_length is not None and longest > max_length):
            # one shared, trimmed prompt: chosen and rejected are judged in the same context
            prompt = pair[0][0][: pair[0][2]]
            responses = [ids[start:] for ids, _, start in pair]
            if max_length is not None:
                prompt, responses = _fit_split(prompt, responses, max_length, report)
        if layout == "dpo":
            out["prompt_ids"].append(prompt)
            if keys == ("completion",):
                out["completion_ids"].append(responses[0])
                out["label"].append(bool(row["label"]))
            else:
                out["chosen_ids"].append(responses[0])
                out["rejected_ids"].append(responses[1])
        elif max_length is not None and longest > max_length:
            out["chosen_ids"].append(prompt + responses[0])
            out["rejected_ids"].append(prompt + responses[1])
        else:
            out["chosen_ids"].append(pair[0][0])
            out["rejected_ids"].append(pair[1][0])
        if has_margin:
            out["margin"].append(float(row["margin"]) if row["margin"] is not None else 0.0)
    return Dataset.from_dict(out), report
