"""`rlhf score`: add a "score" field to each JSONL row using any reward spec (model dir, rules, combination).

    rlhf score --reward SPEC --input rows.jsonl --output scored.jsonl [--batch_size 8] [--log_every 100]

Rows need a prompt (string or messages) and a response (string or assistant messages; "completion" also
accepted). All rows are validated before the reward loads; the output is written atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from stages.core.errors import ConfigError, DataError


def _is_messages(x) -> bool:
    return (isinstance(x, list) and len(x) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x))


def read_rows(path: str) -> list[dict]:
    """Parse and validate the input JSONL; DataError names file, line and field."""
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found", source=path)
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", source=where) from None
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", source=where)
            if "prompt" not in row:
                raise DataError("missing", source=where, field="prompt")
            if not (isinstance(row["prompt"], str) or _is_messages(row["prompt"])):
                raise DataError("expected a string or a list of {role, content} messages", source=where, field="prompt")
            key = "response" if "response" in row else "completion" if "completion" in row else None
            if key is None:
                raise DataError("missing (also accepted: 'completion')", source=where, field="response")
            if not (isinstance(row[key], str) or _is_messages(row[key])):
                raise DataError("expected a string or a list of {role, content} messages", source=where, field=key)
            rows.append(row)
    if not rows:
        raise DataError("no rows", source=path)
    return rows


def write_atomic(path: str, rows: list[dict]) -> None:
    """Write JSONL to a temp file beside `path`, then rename it into place."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="rlhf score", description=__doc__.split("\n")[0])
    ap.add_argument("--reward", required=True, help="reward spec: model dir, 'demo_verifier', JSON/YAML file or inline JSON")
    ap.add_argument("--input", required=True, help="input JSONL with prompt and response fields")
    ap.add_argument("--output", required=True, help="output JSONL (input rows plus 'score')")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=None, help="token limit (prompt trimmed from its start)")
    ap.add_argument("--log_every", type=int, default=100, help="print progress every N rows")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.log_every < 1:
        raise ConfigError("--batch_size and --log_every must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise ConfigError("--output must differ from --input")
    rows = read_rows(args.input)
    from .model import RewardModel
    from .rules import build_reward

    reward = build_reward(args.reward)
    is_model = isinstance(reward, RewardModel)
    scores: list[float] = []
    for s in range(0, len(rows), args.log_every):  # score in blocks of log_every rows, reporting after each
        block = rows[s:s + args.log_every]
        prompts = [r["prompt"] for r in block]
        responses = [r["response"] if "response" in r else r["completion"] for r in block]
        if is_model:
            scores += reward.score(prompts, responses, batch_size=args.batch_size, max_length=args.max_length)
        else:
            scores += reward.score(prompts, responses)
        print(f"[rlhf score] {len(scores)}/{len(rows)} rows", file=sys.stderr, flush=True)
    write_atomic(args.output, [{**r, "score": v} for r, v in zip(rows, scores)])
    n = len(scores)
    summary = {"count": n, "mean": sum(scores) / n, "min": min(scores), "max": max(scores), "output": args.output}
    if is_model:
        summary["truncated"] = reward.truncated
    print("[rlhf score] " + json.dumps(summary), flush=True)
    return 0


cli = main

if __name__ == "__main__":
    sys.exit(main())
