"""Deterministic demo data for the classify stage: customer-support messages in six classes.

Each label is decidable from the text (every message holds one or two cue sentences of its class), yet no
label's name appears in any text, so a model must map meaning to label names, not copy a word. Openers,
fillers and closers are shared by all classes. The multi-label set mixes the cues of one to three classes
per message. `verify_label(text)` recovers the label set from the cues: the machine-checkable truth.

    demo:classify / demo:classify_eval               single-label rows {text, label}
    demo:classify_multi / demo:classify_multi_eval   multi-label rows {text, labels}
"""
from __future__ import annotations

import random

LABELS = ("billing", "delivery", "technical", "login", "praise", "cancellation")
CUES: dict[str, tuple[str, ...]] = {
    "billing": ("I was charged twice on my card", "the invoice shows the wrong amount",
                "the monthly fee went up without notice", "my statement lists a payment I never made",
                "the discount code was not applied to the total", "I paid but the receipt says zero",
                "there is an extra fee on this month's bill", "the price on my plan doubled"),
    "delivery": ("the parcel never arrived", "the courier left the box at the wrong address",
                 "the tracking number has not moved for days", "my package arrived crushed",
                 "the order shipped to my old flat", "only half of the items were in the box",
                 "the van came while I was out and took it back", "it is two weeks late already"),
    "technical": ("the app crashes when I open settings", "error code 503 appears on the start page",
                  "the screen freezes after the update", "syncing stops halfway every time",
                  "the export button does nothing", "the page loads blank on my phone",
                  "uploads fail with a timeout", "the desktop version will not start"),
    "login": ("I cannot reset my password", "the two-factor code never comes",
              "I am locked out after three tries", "the sign-in page rejects my email",
              "my username is not recognised", "the verification link has expired",
              "I forgot which email I registered with", "the one-time code says invalid"),
    "praise": ("your agent was wonderful yesterday", "I am really impressed by the quick help",
               "this is the best support I have had", "the new design looks great",
               "you solved it in five minutes, amazing", "my compliments to the whole team",
               "I love how easy everything is now", "keep up the excellent work"),
    "cancellation": ("please close my subscription", "I want to stop the plan at the end of the month",
                     "do not renew my membership", "end my contract as soon as possible",
                     "I no longer want the service", "remove my card and stop all payments",
                     "terminate the annual plan", "I am leaving for another provider"),
}
OPENERS = ("Hi,", "Hello team,", "Good morning.", "Dear support,", "Hey there,", "To whom it may concern:")
FILLERS = ("I have been a customer for {n} years.", "My reference is {num}.", "I wrote on {day} as well.",
           "This is about the order {num}.", "My name is {name}.", "I am writing from {city}.")
CLOSERS = ("Please reply soon.", "Best, {name}", "Regards, {name}", "Waiting for your answer.", "Cheers, {name}", "")
NAMES = ("Sam", "Ana", "Lee", "Omar", "Kim", "Ravi", "Eva", "Tom", "Mia", "Noor")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
CITIES = ("Leeds", "Porto", "Lyon", "Graz", "Turin", "Ghent", "Cork", "Bergen")


def _fill(s: str, rng: random.Random) -> str:
    return s.format(n=rng.randint(1, 12), num=rng.randint(10000, 99999), day=rng.choice(DAYS),
                    name=rng.choice(NAMES), city=rng.choice(CITIES))


def _message(labels: list[str], rng: random.Random) -> str:
    cues = []
    for lab in labels:
        cues += rng.sample(CUES[lab], 1 if len(labels) > 1 else rng.choice((1, 2)))
    rng.shuffle(cues)
    parts = [rng.choice(OPENERS), _fill(rng.choice(FILLERS), rng)]
    parts += [c[0].upper() + c[1:] + rng.choice((".", "!", ".")) for c in cues]
    parts.append(_fill(rng.choice(CLOSERS), rng))
    text = " ".join(p for p in parts if p)
    assert not any(name in text.lower() for name in LABELS), text  # the label's name never appears
    return text


def verify_label(text: str) -> list[str]:
    """The labels whose cue sentences the text holds (the ground truth by construction)."""
    low = text.lower()
    return [lab for lab in LABELS if any(c.lower() in low for c in CUES[lab])]


def single_label(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": _message([lab], rng), "label": lab} for lab in (LABELS[i % len(LABELS)] for i in range(n))]


def multi_label(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = sorted(rng.sample(LABELS, rng.choice((1, 1, 2, 2, 3))), key=LABELS.index)
        rows.append({"text": _message(labels, rng), "labels": labels})
    return rows


LOADERS = {"classify": lambda: single_label(600, 10), "classify_eval": lambda: single_label(120, 11),
           "classify_multi": lambda: multi_label(600, 12), "classify_multi_eval": lambda: multi_label(120, 13)}
