"""Learnable synthetic classification rows for tiny-model tests: the class is decided by one cue word."""
import random

CUES = {"alpha": ("red", "pink"), "beta": ("blue", "navy"), "gamma": ("gold", "lime"), "delta": ("grey", "snow")}
FILLER = ("the", "a", "fox", "dog", "ran", "sat", "big", "old", "one", "two")


def single_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(CUES)[i % len(CUES)]
        words = [rng.choice(FILLER) for _ in range(4)]
        words.insert(rng.randrange(5), rng.choice(CUES[label]))
        rows.append({"text": f"{i + 1000 * seed} " + " ".join(words), "label": label})
    return rows


def multi_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        labels = sorted(rng.sample(list(CUES), rng.choice((1, 2))))
        words = [rng.choice(FILLER) for _ in range(3)] + [rng.choice(CUES[lab]) for lab in labels]
        rng.shuffle(words)
        rows.append({"text": f"{i + 1000 * seed} " + " ".join(words), "labels": labels})
    return rows
