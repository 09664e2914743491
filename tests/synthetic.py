"""Learnable synthetic preference data for tiny-model tests (decidable by construction)."""
import json
import random

WORDS = ["red", "green", "blue", "pink", "gold", "grey", "teal", "cyan", "lime", "navy", "plum", "rose",
         "sand", "snow", "jade", "ruby", "mint", "rust", "wine", "coal"]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """chosen = a polite reply with the asked word; rejected = a rude one. Two styles each, unique prompts."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w = rng.choice(WORDS)
        prompt = f"Item {i + 1000 * seed}: say {w}"
        chosen = rng.choice(["Hello! {} please", "Thanks! {} kindly"]).format(w)
        rejected = rng.choice(["Ugh. {} whatever", "Meh, {} fine"]).format(w)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
