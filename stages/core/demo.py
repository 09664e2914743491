"""Built-in demo data: "Acme Assist" instruction following with machine-checkable rules.

Every reply must start with GREETING, end with a SIGNOFF line, stay under MAX_WORDS words and
mention the prompt's subject. Prompts may add explicit rules the verifier parses from the prompt:
"Answer in lowercase.", "Use at most N words.", "Mention the word 'X'.",
"Answer with a bulleted list of N items." Content comes from small built-in tables, so a 135M
model can learn the format in minutes while the base model almost never passes.
Everything is deterministic: only `random.Random(seed)` and stable hashes are used.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

GREETING = "Hi there!"
SIGNOFF = "Cheers, Acme Assist"
MAX_WORDS = 40  # global limit on the reply body (greeting and sign-off excluded)

# --- content tables -----------------------------------------------------------------------------
COLOURS = [  # name, thing, other thing, feeling
    ("red", "a ripe tomato", "a fire truck", "bold"), ("blue", "the clear sky", "the deep sea", "calm"),
    ("green", "fresh grass", "a summer leaf", "fresh"), ("yellow", "the bright sun", "a ripe lemon", "sunny"),
    ("purple", "a ripe plum", "a violet flower", "rich"), ("pink", "a flamingo", "cotton candy", "soft"),
    ("brown", "tree bark", "hot chocolate", "earthy"), ("white", "fresh snow", "a glass of milk", "clean"),
    ("black", "the night sky", "a lump of coal", "strong"), ("grey", "a rain cloud", "an old stone wall", "quiet"),
]
FRUITS = [  # name, article, colour, taste, where it grows
    ("apple", "an", "red or green", "crisp and sweet", "on trees"), ("banana", "a", "yellow", "soft and sweet", "in warm places"),
    ("cherry", "a", "dark red", "small and sweet", "on trees"), ("grape", "a", "green or purple", "juicy", "on vines"),
    ("lemon", "a", "yellow", "very sour", "on trees"), ("mango", "a", "orange inside", "sweet and juicy", "in hot places"),
    ("pear", "a", "green", "soft and sweet", "on trees"), ("peach", "a", "orange and pink", "sweet and juicy", "on trees"),
    ("plum", "a", "purple", "sweet and tart", "on trees"), ("kiwi", "a", "brown with green flesh", "tangy", "on vines"),
    ("strawberry", "a", "red", "sweet", "on small plants"), ("melon", "a", "green or yellow", "juicy", "on vines"),
]
ANIMALS = [  # name, article, what it does, where it lives, what it eats
    ("cat", "a", "purrs when it is happy", "in homes", "fish and meat"), ("dog", "a", "barks and wags its tail", "with people", "meat and treats"),
    ("horse", "a", "can run very fast", "on farms", "hay and grass"), ("cow", "a", "says moo", "on farms", "grass"),
    ("owl", "an", "hoots at night", "in trees", "mice"), ("frog", "a", "jumps and croaks", "near ponds", "insects"),
    ("rabbit", "a", "hops on long legs", "in burrows", "carrots and grass"), ("duck", "a", "quacks and swims", "near lakes", "seeds and plants"),
    ("sheep", "a", "has soft wool", "in fields", "grass"), ("bee", "a", "makes honey", "in hives", "nectar from flowers"),
    ("lion", "a", "roars loudly", "on the grasslands", "meat"), ("whale", "a", "sings under the water", "in the ocean", "tiny fish"),
    ("penguin", "a", "cannot fly but swims well", "in cold places", "fish"), ("goat", "a", "climbs steep hills", "on farms", "grass and leaves"),
    ("fox", "a", "has a bushy tail", "in the woods", "small animals"),
]
COUNTRIES = [  # name, capital, continent, language, known for
    ("France", "Paris", "Europe", "French", "fine food"), ("Japan", "Tokyo", "Asia", "Japanese", "sushi"),
    ("Italy", "Rome", "Europe", "Italian", "pizza"), ("Spain", "Madrid", "Europe", "Spanish", "sunny beaches"),
    ("Egypt", "Cairo", "Africa", "Arabic", "the pyramids"), ("Canada", "Ottawa", "North America", "English and French", "maple syrup"),
    ("Kenya", "Nairobi", "Africa", "Swahili and English", "its wildlife"), ("Peru", "Lima", "South America", "Spanish", "Machu Picchu"),
    ("Germany", "Berlin", "Europe", "German", "its castles"), ("Norway", "Oslo", "Europe", "Norwegian", "its fjords"),
    ("Greece", "Athens", "Europe", "Greek", "ancient temples"), ("Brazil", "Brasilia", "South America", "Portuguese", "football"),
    ("China", "Beijing", "Asia", "Chinese", "the Great Wall"), ("Australia", "Canberra", "Oceania", "English", "kangaroos"),
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DEFINITIONS = [  # word, article, four short sentences (the first one defines the word)
    ("river", "a", "A river is a long stream of water.", "It flows into a lake or the sea.", "Fish and plants live in it.", "Boats can sail on a river."),
    ("cloud", "a", "A cloud is a mass of tiny water drops.", "It floats high in the sky.", "Rain falls from dark clouds.", "A cloud can change its shape."),
    ("bridge", "a", "A bridge is a path built over water or a road.", "People walk or drive across it.", "Some bridges are very long.", "A bridge joins two places."),
    ("garden", "a", "A garden is a place where plants grow.", "People grow flowers there.", "Some gardens have vegetables.", "A garden needs water and sun."),
    ("library", "a", "A library is a place full of books.", "You can borrow books there.", "It is usually quiet inside.", "A library is open to everyone."),
    ("kitchen", "a", "A kitchen is a room for cooking food.", "It often has a stove and a sink.", "Families often eat there.", "A kitchen should be kept clean."),
    ("island", "an", "An island is land with water all around it.", "Some islands are very small.", "You reach it by boat or plane.", "An island can have sandy beaches."),
    ("candle", "a", "A candle is a stick of wax with a wick.", "It gives light when it burns.", "People light candles on birthdays.", "A candle should not be left alone."),
    ("forest", "a", "A forest is a large area full of trees.", "Many animals live there.", "Forests help keep the air clean.", "A forest can be dark and still."),
    ("clock", "a", "A clock is a tool that shows the time.", "It has numbers and hands.", "Some clocks ring in the morning.", "A clock helps you stay on time."),
]
HELDOUT_SUBJECTS = ("pink", "kiwi", "melon", "goat", "fox", "Norway", "Peru", "Thursday", "candle", "island")
KEYWORDS = ["lovely", "special", "popular", "interesting", "pleasant", "wonderful", "unique", "classic", "charming", "familiar"]
KEYWORD_SENTENCES = ["It is {}.", "Many people find it {}.", "I think it is {}."]
GENERAL_QUESTIONS = ["Tell me about {d}.", "Describe {d}.", "Give me some facts about {d}.", "What do you know about {d}?", "Write a short note about {d}."]
CATEGORY_QUESTIONS = {
    "colour": ["Name something that is {k}.", "What does the colour {k} remind you of?"],
    "fruit": ["What colour is {d}?", "What is {d} like?"], "animal": ["What is {d}?", "What does {d} do?"],
    "country": ["What is the capital of {k}?"], "weekday": ["What day comes after {k}?"],
    "definition": ["What is {d}?", "Define the word {k}.", "What does the word {k} mean?"],
}
BLAND = [
    "That is a good thing to ask about.", "That is a great question, and I am happy to help.",
    "Thanks for asking. There is a lot to say about this topic.",
    "Good question! Many people wonder about this, and it is worth a look.",
    "I can help with that. It is a big subject with many details to explore.",
    "Sure, that is something a lot of people ask about. Let me know if you want to hear more.",
]
FILLER = ["There is a lot more to say about it.", "People have talked about it for a long time.", "I could go on about this all day."]
ALT_GREETINGS = ["", "", "Hello!", "Sure!", "Hi!", "Hello there!"]
ALT_SIGNOFFS = ["", "", "Hope this helps!", "Cheers!", "Have a nice day!", "Acme Assist"]


@dataclass(frozen=True)
class Subject:
    key: str
    category: str
    display: str
    facts: tuple  # facts[0] always names the subject


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _subjects() -> list[Subject]:
    out = [Subject(k, "colour", f"the colour {k}", (f"{_cap(k)} is the colour of {a}.", f"{_cap(b)} is often {k}.",
                                                     f"{_cap(k)} can feel {m}.", f"Artists often paint with {k}."))
           for k, a, b, m in COLOURS]
    out += [Subject(k, "fruit", f"{a} {k}", (f"{_cap(a)} {k} is usually {c}.", f"It tastes {t}.", f"It grows {w}.",
                                              f"{_cap(a)} {k} is a healthy fruit.")) for k, a, c, t, w in FRUITS]
    out += [Subject(k, "animal", f"{a} {k}", (f"{_cap(a)} {k} is an animal that {d}.", f"It usually lives {h}.",
                                               f"It likes to eat {f}.", f"{_cap(a)} {k} is fun to watch.")) for k, a, d, h, f in ANIMALS]
    out += [Subject(k, "country", k, (f"The capital of {k} is {c}.", f"{k} is a country in {co}.", f"People there speak {lang}.",
                                       f"{k} is known for {kn}.")) for k, c, co, lang, kn in COUNTRIES]
    for i, d in enumerate(WEEKDAYS):
        prev, nxt = WEEKDAYS[i - 1], WEEKDAYS[(i + 1) % 7]
        last = f"{d} is part of the weekend." if i >= 5 else f"Many people go to work on {d}."
        out.append(Subject(d, "weekday", d, (f"{nxt} comes after {d}.", f"{d} is a day of the week.", f"{d} comes right after {prev}.", last)))
    out += [Subject(w, "definition", f"{a} {w}", tuple(s)) for w, a, *s in DEFINITIONS]
    return out


SUBJECTS = _subjects()
_BY_KEY = {s.key.lower(): s for s in SUBJECTS}
TRAIN_SUBJECTS = [s for s in SUBJECTS if s.key not in HELDOUT_SUBJECTS]
EVAL_SUBJECTS = [s for s in SUBJECTS if s.key in HELDOUT_SUBJECTS]

# --- rules and the verifier ---------------------------------------------------------------------
_RE_LOWER = re.compile(r"Answer in lowercase\.")
_RE_LIMIT = re.compile(r"Use at most (\d+) words\.")
_RE_KEYWORD = re.compile(r"Mention the word '([^']+)'\.")
_RE_BULLETS = re.compile(r"Answer with a bulleted list of (\d+) items\.")
_RE_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def _rule_sentences(rules: dict) -> list[str]:
    out = []
    if rules.get("lowercase"):
        out.append("Answer in lowercase.")
    if rules.get("word_limit"):
        out.append(f"Use at most {rules['word_limit']} words.")
    if rules.get("keyword"):
        out.append(f"Mention the word '{rules['keyword']}'.")
    if rules.get("bullets"):
        out.append(f"Answer with a bulleted list of {rules['bullets']} items.")
    return out


def _words(text: str) -> int:
    return len(_RE_WORD.findall(text))


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}(?:s|es)?\b", text, re.IGNORECASE) is not None


@dataclass
class Verdict:
    passed: bool
    failures: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)


def _text(x) -> str:
    """Accept a string, a message dict or a list of messages (the last one's content)."""
    if isinstance(x, list):
        x = x[-1] if x else ""
    return x.get("content", "") if isinstance(x, dict) else str(x)


def verify(prompt, response) -> Verdict:
    """Check `response` against the fixed voice rules plus every rule stated in `prompt`."""
    prompt, text = _text(prompt), _text(response).strip()
    lines = text.splitlines()
    body = text[len(GREETING):] if text.startswith(GREETING) else text
    if lines and lines[-1].strip() == SIGNOFF:
        body = body.rstrip()[: -len(SIGNOFF)]
    body = body.strip()
    checks = {"greeting": text.startswith(GREETING), "signoff": bool(lines) and lines[-1].strip() == SIGNOFF,
              "nonempty": _words(body) > 0, "max_words": _words(body) <= MAX_WORDS}
    question = _RE_KEYWORD.sub("", prompt)
    topics = [s.key for s in SUBJECTS if re.search(rf"\b{re.escape(s.key)}\b", question, re.IGNORECASE)]
    if topics:
        checks["on_topic"] = any(_mentions(body, k) for k in topics)
    if _RE_LOWER.search(prompt):
        checks["lowercase"] = body == body.lower()
    if m := _RE_LIMIT.search(prompt):
        checks["word_limit"] = _words(body) <= int(m.group(1))
    if m := _RE_KEYWORD.search(prompt):
        checks["keyword"] = _mentions(body, m.group(1))
    if m := _RE_BULLETS.search(prompt):
        items = [ln.strip() for ln in body.splitlines() if ln.strip()]
        checks["bullets"] = len(items) == int(m.group(1)) and all(ln.startswith("- ") for ln in items)
    failures = [k for k, ok in checks.items() if not ok]
    return Verdict(passed=not failures, failures=failures, checks=checks)


def pass_rate(prompts: list, responses: list) -> float:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return 0.0
    return sum(verify(p, r).passed for p, r in zip(prompts, responses)) / len(prompts)


# --- generation ---------------------------------------------------------------------------------
@dataclass
class _Reply:  # a structured reply, rendered by _render
    sentences: list
    bullets: bool = False
    numbered: bool = False
    lower: bool = False
    greeting: str = GREETING
    signoff: str = SIGNOFF


def _render(r: _Reply) -> str:
    if r.numbered:
        body = "\n".join(f"{i}. {s}" for i, s in enumerate(r.sentences, 1))
    else:
        body = "\n".join(f"- {s}" for s in r.sentences) if r.bullets else " ".join(r.sentences)
    body = body.lower() if r.lower else body
    return "\n".join(x for x in (r.greeting, body, r.signoff) if x)


def _split_of(canonical: str) -> str:
    return "eval" if int(hashlib.sha256(canonical.encode()).hexdigest()[:8], 16) % 100 < 15 else "train"


def _sample_prompt(rng: random.Random, pool: list[Subject]):
    subj = rng.choice(pool)
    question = rng.choice(GENERAL_QUESTIONS + CATEGORY_QUESTIONS[subj.category]).format(d=subj.display, k=subj.key)
    rules = {"lowercase": rng.random() < 0.35, "word_limit": rng.choice([10, 12, 15, 20]) if rng.random() < 0.4 else 0,
             "keyword": rng.choice(KEYWORDS) if rng.random() < 0.4 else "", "bullets": rng.choice([2, 3, 4]) if rng.random() < 0.3 else 0}
    sentences = _rule_sentences(rules)
    canonical = "|".join([question, *sorted(sentences)])
    rng.shuffle(sentences)
    return subj, rules, " ".join([question, *sentences]), canonical


def _chosen(rng: random.Random, subj: Subject, rules: dict) -> _Reply | None:
    facts = [subj.facts[0], *rng.sample(subj.facts[1:], len(subj.facts) - 1)]
    kw = [rng.choice(KEYWORD_SENTENCES).format(rules["keyword"])] if rules["keyword"] else []
    if rules["bullets"]:
        sents = facts[: rules["bullets"] - len(kw)] + kw
    else:
        sents = facts[: rng.choice([1, 2, 3] if rules["word_limit"] else [2, 3])] + kw
        while rules["word_limit"] and _words(" ".join(sents)) > rules["word_limit"] and len(sents) > 1 + len(kw):
            sents.pop(len(sents) - 1 - len(kw))
    reply = _Reply(sents, bullets=bool(rules["bullets"]), lower=rules["lowercase"])
    return reply if _words(" ".join(sents)) <= min(MAX_WORDS, rules["word_limit"] or MAX_WORDS) else None


_CHECK_OF = {"greeting": "greeting", "signoff": "signoff", "lowercase": "lowercase", "word_limit": "word_limit",
             "keyword": "keyword", "bullets": "bullets", "bland": "on_topic"}


def _rejected(rng: random.Random, subj: Subject, rules: dict, good: _Reply) -> tuple[_Reply, list[str]]:
    """Break the chosen reply in one to three realistic ways; returns the reply and the intended violations."""
    options = ["greeting", "signoff", "bland"] + [k for k in ("lowercase", "word_limit", "keyword", "bullets") if rules[k]] * 3
    k = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    picked = []
    while len(picked) < k and len(set(options) - set(picked)) > 0:
        v = rng.choice(options)
        if v not in picked:
            picked.append(v)
    if "bland" in picked:
        picked = [v for v in picked if v in ("bland", "greeting", "signoff", "lowercase")]
    r = _Reply(list(good.sentences), good.bullets, False, good.lower)
    n_words = _words(" ".join(good.sentences))
    for v in picked:
        if v == "greeting":
            r.greeting = rng.choice(ALT_GREETINGS)
        elif v == "signoff":
            r.signoff = rng.choice(ALT_SIGNOFFS)
        elif v == "lowercase":
            r.lower = False
        elif v == "bland":
            r.sentences, r.bullets = [sorted(BLAND, key=lambda b: (abs(_words(b) - n_words), b))[rng.randrange(2)]], False
        elif v == "keyword":
            other = rng.choice([w for w in KEYWORDS if w != rules["keyword"]])
            r.sentences = [re.sub(rf"\b{rules['keyword']}\b", other, s) for s in r.sentences]
        elif v == "word_limit":
            extra = [f for f in subj.facts if f not in r.sentences] + rng.sample(FILLER, len(FILLER))
            while _words(" ".join(r.sentences)) <= rules["word_limit"] and extra:
                r.sentences.insert(len(r.sentences) - (1 if rules["keyword"] else 0), extra.pop(0))
        elif v == "bullets":
            mode = rng.choice(["prose", "numbered", "count"])
            if mode == "prose":
                r.bullets = False
            elif mode == "numbered":
                r.numbered = True
            elif len(r.sentences) > 2 and rng.random() < 0.5:
                r.sentences.pop(1)
            else:
                extra = [f for f in subj.facts if f not in r.sentences]
                if extra:
                    r.sentences.insert(1, extra[0])
                else:
                    r.sentences.pop(1)
    return r, picked


def _generate(kind: str, split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{kind}:{seed}")
    pool = EVAL_SUBJECTS if split == "heldout" else TRAIN_SUBJECTS
    out, seen, attempts = [], set(), 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 + 200 * n:
            raise RuntimeError(f"could not generate {n} unique {kind} rows for split {split!r}")
        subj, rules, prompt, canonical = _sample_prompt(rng, pool)
        if prompt in seen or (split != "heldout" and _split_of(canonical) != split):
            continue
        good = _chosen(rng, subj, rules)
        if good is None or not verify(prompt, _render(good)).passed:
            continue
        user = [{"role": "user", "content": prompt}]
        if kind == "sft":
            row = {"messages": user + [{"role": "assistant", "content": _render(good)}]}
        elif kind == "preference":
            bad, picked = _rejected(rng, subj, rules, good)
            failures = verify(prompt, _render(bad)).failures
            if not picked or not {_CHECK_OF[v] for v in picked} <= set(failures):
                continue
            row = {"prompt": user, "chosen": [{"role": "assistant", "content": _render(good)}],
                   "rejected": [{"role": "assistant", "content": _render(bad)}]}
        else:
            row = {"prompt": user}
        seen.add(prompt)
        out.append(row)
    return out


def sft_examples(n: int = 400, seed: int = 0) -> list[dict]:
    return _generate("sft", "train", n, seed)


def preference_pairs(n: int = 400, seed: int = 1) -> list[dict]:
    return _generate("preference", "train", n, seed)


def heldout_prompts(n: int = 64, seed: int = 2) -> list[dict]:
    """Prompts about subjects that never appear in any SFT or preference set."""
    return _generate("prompts", "heldout", n, seed)


_LOADERS = {
    "sft": lambda: sft_examples(), "sft_eval": lambda: _generate("sft", "eval", 64, 3),
    "preference": lambda: preference_pairs(), "preference_eval": lambda: _generate("preference", "eval", 64, 4),
    "prompts": lambda: heldout_prompts(),
}
NAMES = tuple(_LOADERS)


CLASSIFY_NAMES = ("classify", "classify_eval", "classify_multi", "classify_multi_eval")  # demo_classify.py


def load(name: str) -> list[dict]:
    if name in CLASSIFY_NAMES:
        from stages.core.demo_classify import LOADERS

        return LOADERS[name]()
    if name not in _LOADERS:
        from stages.core.errors import ConfigError
        raise ConfigError(f"unknown demo dataset '{name}'; choose one of {', '.join(NAMES + CLASSIFY_NAMES)}")
    return _LOADERS[name]()


def write_all(out_dir) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in NAMES:
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in load(name)), encoding="utf-8")
    return paths


def cli(argv: list[str] | None = None) -> int:
    """`rlhf demo-data OUT_DIR` / `python -m stages.core.demo OUT_DIR`: write every demo set as JSONL."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m stages.core.demo OUT_DIR  (writes " + ", ".join(f"{n}.jsonl" for n in NAMES) + ")",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    for name, path in write_all(argv[0]).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
