"""Label rows with a classify stage output (or its export).

    rlhf predict runs/x/classify --input rows.jsonl --output preds.jsonl [--top-k 3] [--batch-size 32]

Each input row needs `text` (or chat `messages`); every other field is copied through. Each output row adds
`label` (single-label: the argmax) or `labels` (multi-label: every label whose sigmoid score reaches the tuned
threshold in labels.json), `scores` (every label's probability) and `top_k` ([label, score] pairs, best
first); where the input already has one of these columns (a gold `label`, say), it is kept and the
prediction is written as `predicted_label` etc. Rows are scored in batches; the output is written to a temporary file and renamed into place.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from stages.core import stage as S  # noqa: E402
from stages.core.errors import ConfigError  # noqa: E402

STAGE = "predict"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf predict", description="Label rows with a classify output or its export.")
    p.add_argument("run", metavar="RUN", help="a classify stage output (or its export), e.g. runs/x/classify")
    p.add_argument("--input", required=True, help="JSONL/JSON/CSV/Parquet rows with `text` (or `messages`)")
    p.add_argument("--output", required=True, help="JSONL file to write (replaced atomically)")
    p.add_argument("--top-k", dest="top_k", type=int, default=3, help="labels listed per row, best first (default 3)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--threshold", type=float, default=None, help="multi-label: override the tuned threshold")
    p.add_argument("--text-field", dest="text_field", default=None, help="the input column holding the text")
    return p.parse_args(argv)


def predict_rows(model, tokenizer, info: dict, rows: list[dict], *, top_k: int = 3, batch_size: int = 32,
                 threshold: float | None = None) -> list[dict]:
    from stages.core.classify_data import render_input
    from stages.core.classify_model import probabilities, score_texts

    labels, multi = info["labels"], info["multi_label"]
    texts = [render_input(r, tokenizer) for r in rows]
    logits = score_texts(model, tokenizer, texts, max_length=info.get("max_length"),
                         truncation_side=info.get("truncation_side", "right"), batch_size=batch_size)
    probs = probabilities(logits, multi)
    cut = threshold if threshold is not None else (info.get("threshold") if info.get("threshold") is not None else 0.5)
    out = []
    for p in probs:
        scores = {n: float(v) for n, v in zip(labels, p)}
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        pred = {"labels": [n for n, v in scores.items() if v >= cut]} if multi else {"label": ranked[0][0]}
        out.append({**pred, "scores": scores, "top_k": [[n, v] for n, v in ranked[:top_k]]})
    return out


def main(argv=None) -> Path:
    from stages.core.classify_data import read_input_rows
    from stages.core.classify_model import load_classifier
    from stages.core.readers import read_file

    args = parse(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError("--top-k and --batch-size: must be at least 1")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise ConfigError(f"--threshold: must be between 0 and 1, got {args.threshold}")
    out = Path(args.output).expanduser()
    if out.is_dir():
        raise ConfigError(f"--output {out}: is a directory; give a file name")
    if out.resolve() == Path(args.input).expanduser().resolve():
        raise ConfigError(f"--output {out}: is the input file; predictions never replace the rows they were made from")
    mapping = {"text": args.text_field} if args.text_field else None
    rows = read_input_rows(args.input, mapping)
    raw = read_file(Path(args.input))
    model, tokenizer, info = load_classifier(args.run)
    S.log(STAGE, f"{len(rows)} rows, labels: {', '.join(info['labels'])}")
    preds = predict_rows(model, tokenizer, info, rows, top_k=args.top_k, batch_size=args.batch_size,
                         threshold=args.threshold)
    taken = sorted({k for src in raw for k in src} & {k for pred in preds for k in pred})
    if taken:  # e.g. a gold `label` column: kept as it is, the prediction goes beside it
        S.log(STAGE, f"the input already has {', '.join(taken)}: predictions are written as "
                     f"{', '.join('predicted_' + k for k in taken)}")
        preds = [{("predicted_" + k if k in taken else k): v for k, v in pred.items()} for pred in preds]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for src, pred in zip(raw, preds):
                f.write(json.dumps({**src, **pred}, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    S.log(STAGE, f"wrote {out}")
    return out


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
