"""Benchmarks: the suite's stages against plain TRL, on one machine, in one run (`make bench`).

    python tests/bench/bench.py                      # SmolLM2-135M-Instruct, the full set (~15 min on 2 cores)
    python tests/bench/bench.py --only matmul,sft    # a subset
    python tests/bench/bench.py --model PATH --steps 4 --ppo-steps 2   # any local model (the tests use a tiny one)

Every measurement runs in a process of its own, so its peak RSS is that process's own maximum resident
set (os.wait4). Step time is the median optimiser step after WARMUP steps; tokens/s counts the non-padding
tokens the trained model's forward passes saw in those steps (the same hook on ours and on TRL's), not
the reference's. MFU = model FLOPs/s over the bf16 matmul peak measured in the same run. Speed ratios
compare runs of this one invocation only: this machine's run-to-run noise is ±15%, so the pair that decides
the tightest speed target (real-length SFT against TRL) is measured `--repeats` times (the repeats after the
first alternate ours and TRL's) and reported as the median step time and the median tokens/s (each a
median of its own) with the highest peak RSS of its repeats; the table lists every repeat's tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers import ROOT, SFT_VARIANTS, WARMUP, worker_main  # this folder is on sys.path when run as a script

DEMO_RUNS = ["sft", "sft-trl", "dpo", "dpo-gc", "dpo-trl", "ppo-onebase", "ppo-onebase-all-logits", "ppo-full", "full-512",
             "full-512-compile", "full-512-pure-bf16"]
REAL_RUNS = [*SFT_VARIANTS, "sft-real-trl", "rm-real", "rm-real-return-freed-memory", "rm-real-trl", "dpo-real",
             "dpo-real-trl"]
OPT_IN_RUNS = ["ppo-onebase-vllm"]  # --only: needs `make vllm-env` (vLLM's own environment)
RUNS = ["matmul", *DEMO_RUNS, *REAL_RUNS, *OPT_IN_RUNS]
PAIRS = {  # ours vs the baseline it is compared with
    "sft": "sft-trl", "dpo": "dpo-trl", "dpo-gc": "dpo-trl", "ppo-onebase": "ppo-full",
    "ppo-onebase-all-logits": "ppo-onebase", "ppo-onebase-vllm": "ppo-onebase", "full-512-compile": "full-512", "full-512-pure-bf16": "full-512",
    "sft-real": "sft-real-trl", "rm-real": "rm-real-trl", "dpo-real": "dpo-real-trl",
    **{name: "sft-real" for name in SFT_VARIANTS if name != "sft-real"},  # each default off vs all on
    "rm-real-return-freed-memory": "rm-real",
}
REPEATED = ("sft-real", "sft-real-trl")  # measured --repeats times (module docstring)
TARGETS = [  # (what, run, baseline, metric, op, bound)
    ("SFT tokens/s vs plain TRL", "sft", "sft-trl", "tokens_per_s", ">=", 1.5),
    ("DPO step time vs TRL + separate reference", "dpo", "dpo-trl", "step_s", "<=", 0.7),
    ("DPO peak RSS vs TRL + separate reference", "dpo", "dpo-trl", "peak_rss_gb", "<=", 0.6),
    ("DPO, gradient checkpointing on: step time vs TRL", "dpo-gc", "dpo-trl", "step_s", "<=", 0.7),
    ("DPO, gradient checkpointing on: peak RSS vs TRL", "dpo-gc", "dpo-trl", "peak_rss_gb", "<=", 0.6),
    ("full fine-tuning MFU at length 512 (of bf16 peak)", "full-512", None, "mfu", ">=", 0.40),
    ("real-length SFT tokens/s vs plain TRL", "sft-real", "sft-real-trl", "tokens_per_s", ">=", 2.0),
    ("real-length SFT peak RSS vs plain TRL", "sft-real", "sft-real-trl", "peak_rss_gb", "<=", 0.7),
    ("real-length RM peak RSS vs TRL (same pre-truncated pairs)", "rm-real", "rm-real-trl", "peak_rss_gb", "<=", 0.7),
    ("real-length RM step time vs TRL", "rm-real", "rm-real-trl", "step_s", "<=", 0.8),
    ("real-length DPO peak RSS vs TRL + separate reference", "dpo-real", "dpo-real-trl", "peak_rss_gb", "<=", 0.7),
    ("real-length DPO step time vs TRL + separate reference", "dpo-real", "dpo-real-trl", "step_s", "<=", 0.8),
]


# ---------------------------------------------------------------------------------------------------
# the parent: run each worker in its own process, then report
# ---------------------------------------------------------------------------------------------------
def run_worker(name: str, spec: dict, workdir: Path, log, tag: str = "") -> dict:
    spec_path, result_path = workdir / f"{name}{tag}.spec.json", workdir / f"{name}{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    logfile = workdir / f"{name}{tag}.log"
    log(f"[bench] {name} ... (log: {logfile})")
    t0 = time.perf_counter()
    with open(logfile, "w") as fh:
        p = subprocess.Popen([sys.executable, __file__, "--worker", name, spec_path, result_path], cwd=ROOT,
                             stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not result_path.exists():
        tail = logfile.read_text()[-2000:]
        raise SystemExit(f"bench: {name} failed (exit {code}); the end of {logfile}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # KiB on Linux
    result["wall_s"] = wall
    log(f"[bench] {name}: done in {wall:.0f} s")
    return result


def merge_repeats(measured: list[dict]) -> dict:
    """One run's figures from its repeats: the median step time and tokens/s, the highest peak RSS (memory is
    a bound, not an average); the other fields from the first repeat, and each repeat's figures under "repeats"."""
    merged = dict(measured[0])
    for metric in ("step_s", "tokens_per_s"):
        merged[metric] = statistics.median(r[metric] for r in measured)
    merged["peak_rss_gb"] = max(r["peak_rss_gb"] for r in measured)
    merged["repeats"] = [{k: r[k] for k in ("step_s", "tokens_per_s", "peak_rss_gb")} for r in measured]
    return merged


def add_mfu(results: dict) -> None:
    peak = results.get("matmul", {}).get("bf16_flops")
    for name, r in results.items():
        if name == "matmul" or not peak:
            continue
        if "flops_per_token" in r:
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak


def check_targets(results: dict) -> list[dict]:
    out = []
    for what, run, base, metric, op, bound in TARGETS:
        if run not in results or (base and base not in results) or metric not in results[run]:
            continue
        value = results[run][metric] / results[base][metric] if base else results[run][metric]
        met = value >= bound if op == ">=" else value <= bound
        out.append({"target": what, "value": value, "bound": f"{op} {bound}", "met": met})
    return out


def workload_lengths(model: str, steps: int) -> dict:
    """Token lengths of the real-length rows under the model's chat template (quoted with the figures): the
    SFT runs' rows (one epoch of `steps` batches), the 512-row distribution they are drawn from, the pairs."""
    from transformers import AutoTokenizer

    from stages.core.models import resolve_model
    from workload import instruction_rows, preference_rows, lengths

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    from workers import REAL

    return {"sft": lengths(instruction_rows(steps * REAL["sft"]["batch"]), tokenizer),
            "sft-distribution": lengths(instruction_rows(), tokenizer), "pairs": lengths(preference_rows(), tokenizer)}


def table(results: dict, targets: list[dict]) -> str:
    lines = []
    mm = results.get("matmul")
    if mm:
        lines.append(f"matmul peak ({mm['threads']} threads): fp32 {mm['fp32_flops'] / 1e9:,.0f} GFLOP/s, "
                     f"bf16 {mm['bf16_flops'] / 1e9:,.0f} GFLOP/s")
    head = f"{'run':<26} {'step s':>8} {'tokens/s':>9} {'peak RSS GB':>12} {'MFU':>6}  vs baseline"
    lines += [head, "-" * len(head)]
    for name, r in results.items():
        if name == "matmul":
            continue
        rel = ""
        base = PAIRS.get(name)
        if base in results:
            b = results[base]
            rel = (f"{base}: tokens/s x{r['tokens_per_s'] / b['tokens_per_s']:.2f}, step x{r['step_s'] / b['step_s']:.2f}, "
                   f"RSS x{r['peak_rss_gb'] / b['peak_rss_gb']:.2f}")
            if name.startswith("full-512-") and r.get("train_loss_last_half") and b.get("train_loss_last_half"):
                rel += f", train loss {r['train_loss_last_half']:.3f} vs {b['train_loss_last_half']:.3f}"
        if len(r.get("repeats", ())) > 1:
            rel += ("; " if rel else "") + f"median of {len(r['repeats'])} runs (tokens/s " + ", ".join(
                f"{x['tokens_per_s']:.1f}" for x in r["repeats"]) + ")"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        lines.append(f"{name:<26} {r['step_s']:>8.2f} {r['tokens_per_s']:>9.1f} {r['peak_rss_gb']:>12.2f} {mfu:>6}  {rel}")
    if targets:
        lines.append("")
        for t in targets:
            lines.append(f"{'met ' if t['met'] else 'MISS'} {t['target']}: {t['value']:.2f} (target {t['bound']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias, Hub id or local directory")
    ap.add_argument("--steps", type=int, default=10, help=f"optimiser steps per training run (first {WARMUP} not timed)")
    ap.add_argument("--ppo-steps", type=int, default=3, help="PPO updates per mode (the first is not timed)")
    ap.add_argument("--full-batch", type=int, default=4, help="batch of 512-token sequences for the full fine-tuning run")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(RUNS)}")
    ap.add_argument("--workload", choices=("demo", "real", "both"), default="both",
                    help="demo rows (~80 tokens), real-length rows (tests/bench/workload.py: median ~180, p90 ~450), or both")
    ap.add_argument("--repeats", type=int, default=3, help=f"times {' and '.join(REPEATED)} run (medians)")
    ap.add_argument("--out", default="runs/bench/bench.json", help="where the JSON report goes")
    ap.add_argument("--worker", nargs=3, metavar=("NAME", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker_main(*a.worker)
        return 0
    default = ["matmul", *(DEMO_RUNS if a.workload != "real" else []), *(REAL_RUNS if a.workload != "demo" else [])]
    only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else default
    unknown = sorted(set(only) - set(RUNS))
    if unknown:
        ap.error(f"--only: unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as shared:
        spec = {"model": a.model, "steps": a.steps, "ppo_steps": a.ppo_steps, "full_batch": a.full_batch,
                "shared": shared, "matmul_sizes": [1024, 2048], "matmul_repeats": 3}
        work = out.parent / "logs"
        work.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        for name in RUNS:
            if name not in only:
                continue
            if name.startswith("ppo") and not (Path(shared) / "rm").exists():
                run_worker("rm-for-ppo", spec, work, log)
            results[name] = run_worker(name, spec, work, log)
        repeated = {name: [results[name]] for name in REPEATED if name in results}
        for i in range(2, a.repeats + 1):
            for name in repeated:
                repeated[name].append(run_worker(name, spec, work, log, tag=f"-{i}"))
        results.update({name: merge_repeats(measured) for name, measured in repeated.items()})
    add_mfu(results)
    targets = check_targets(results)
    import torch

    report = {"model": a.model, "steps": a.steps, "workload_lengths": workload_lengths(a.model, a.steps) if any(
                  "real" in n for n in results) else None, "warmup_steps": WARMUP, "torch": torch.__version__,
              "cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "total_s": time.perf_counter() - t0,
              "command": "python tests/bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": results, "targets": targets}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    if report["workload_lengths"]:
        for kind, summary in report["workload_lengths"].items():
            print(f"real-length {kind} rows (tokens): median {summary['median']}, p90 {summary['p90']}, max {summary['max']}, "
                  f"{100 * summary['over_512']:.0f}% over 512, {100 * summary['over_384']:.0f}% over 384")
    print(table(results, targets))
    print(f"\n(JSON: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
