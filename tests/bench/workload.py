"""A real-length workload for `make bench`: project-authored rows whose token lengths follow real data.

Demo rows (~80 tokens) hide what real instruction data costs: padding, activations and `[tokens x vocab]`
tensors all grow with length. Real instruction sets run from ~40 to ~750 tokens with a median near 180
and a p90 near 450 (Alpaca/Dolly/OpenAssistant-style mixes), so the generator draws each row's total
length from a log-normal with that median and spread (sigma 0.72 puts p90 at ~450 and ~7% of rows past
512 tokens, so truncation happens) and fills it with deterministic pseudo-English. The text is not
meant to be learnable; only its lengths and its prompt/response split matter for speed and memory.
Preference pairs draw a shared prompt and two responses of different lengths the same way.
"""
from __future__ import annotations

import math
import random

MEDIAN_TOKENS = 170
SIGMA = 0.78  # with the chat template's ~20 tokens: median ~180, p90 ~450
MIN_TOKENS, MAX_TOKENS = 40, 900
TOKENS_PER_WORD = 1.3  # SmolLM2's tokenizer on this word list (measured by `lengths` below)

_WORDS = (
    "the model data train answer question explain system value number water city river history science "
    "music energy light small large quickly because however therefore example describe important people "
    "country language computer program function result method process change between during without "
    "before after across under above simple complex every other first second third final common "
    "student teacher market price growth health doctor garden kitchen travel weather winter summer "
    "mountain forest ocean planet star orbit signal network memory storage reason evidence argument "
    "policy design pattern structure table column record report summary detail context response"
).split()


def _length(rng: random.Random, median: float = MEDIAN_TOKENS, sigma: float = SIGMA) -> int:
    return int(min(MAX_TOKENS, max(MIN_TOKENS, round(math.exp(rng.gauss(math.log(median), sigma))))))


def _text(rng: random.Random, tokens: int) -> str:
    words, out = max(3, round(tokens / TOKENS_PER_WORD)), []
    while len(out) < words:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        out += [sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."]
    return " ".join(out[:words])


def instruction_rows(n: int = 512, seed: int = 0) -> list[dict]:
    """Prompt/completion rows; the prompt takes 15-45% of each row's tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = _length(rng)
        prompt = max(8, int(total * rng.uniform(0.15, 0.45)))
        rows.append({"messages": [{"role": "user", "content": _text(rng, prompt)},
                                  {"role": "assistant", "content": _text(rng, total - prompt)}]})
    return rows


def preference_rows(n: int = 256, seed: int = 1) -> list[dict]:
    """Explicit-prompt pairs: one prompt, two responses drawn independently (so their lengths differ)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = _length(rng, median=70, sigma=0.8)
        rows.append({"prompt": [{"role": "user", "content": _text(rng, prompt)}],
                     "chosen": [{"role": "assistant", "content": _text(rng, _length(rng, 150, 0.7))}],
                     "rejected": [{"role": "assistant", "content": _text(rng, _length(rng, 150, 0.7))}]})
    return rows


def lengths(rows: list[dict], tokenizer) -> dict:
    """Token-length summary of rows as the chat template renders them (what the bench report quotes)."""
    counts = []
    for row in rows:
        if "messages" in row:
            counts.append(len(_ids(tokenizer, row["messages"])))
        else:
            counts += [len(_ids(tokenizer, row["prompt"] + row[k]))
                       for k in ("chosen", "rejected")]
    counts.sort()
    pick = lambda q: counts[min(len(counts) - 1, int(q * len(counts)))]  # noqa: E731
    return {"rows": len(rows), "median": pick(0.5), "p90": pick(0.9), "max": counts[-1],
            "over_512": sum(c > 512 for c in counts) / len(counts), "over_384": sum(c > 384 for c in counts) / len(counts)}


def _ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
