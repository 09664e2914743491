"""Win-rate evaluation stage: policy vs reference on held-out prompts, judged pairwise, reported.

    python -m stages.evaluate --policy runs/x/dpo --reference runs/x/sft --judge runs/x/rm \\
        --prompts demo:prompts --out runs/x/winrate
    (also `rlhf winrate ...`, where --out defaults to runs/x/winrate-dpo-vs-sft)

Both models generate with identical decoding (greedy by default); generations are cached in
OUT/generations and reused while the models, prompts and decoding are unchanged. The judge is a reward
model dir, a verifier/rule, a local LLM (position-swapped) or an OpenAI-compatible endpoint (see
reward.judges.SPEC_HELP). OUT gets report.json, report.md, winrate.png, per_prompt.jsonl and, last, a
manifest.json (status complete) whose fingerprint lets a re-run with the same inputs do nothing (--force:
judge again; the generation cache still applies).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # `python stages/evaluate.py` runs this file as a script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from stages.core import stage as S  # noqa: E402
from stages.core.errors import ConfigError  # noqa: E402

STAGE = "evaluate"


def build_parser(prog: str = "python -m stages.evaluate", out_required: bool = True) -> argparse.ArgumentParser:
    from reward.judges import SPEC_HELP

    ap = argparse.ArgumentParser(prog=prog, description="Preference win rate of a policy against a reference.")
    ap.add_argument("--policy", required=True, help="policy model: a stage output dir, model dir or Hub id")
    ap.add_argument("--reference", required=True, help="reference model (e.g. the SFT output)")
    ap.add_argument("--judge", required=True, help=SPEC_HELP)
    ap.add_argument("--prompts", required=True, help="held-out prompts: a JSONL/JSON/CSV/parquet file or demo:prompts")
    ap.add_argument("--out", required=out_required, default=None, help="report directory")
    ap.add_argument("--max_prompts", type=int, default=None, help="evaluate only the first N prompts (seeded order)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--batch_size", type=int, default=8, help="generation and judging batch size")
    ap.add_argument("--seed", type=int, default=0, help="sampling, prompt order and bootstrap seed")
    ap.add_argument("--n_bootstrap", type=int, default=2000)
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--force", action="store_true", help="judge again even if OUT holds this exact evaluation")
    ap.add_argument("--verbose", action="store_true", help="show every third-party warning (stages/core/noise.py)")
    return ap


def load_prompts(spec: str, *, seed: int = 0, max_prompts: int | None = None) -> tuple[list, dict]:
    """Prompts (message lists) from any prompt-capable data source, deduplicated; plus a small report."""
    from stages.core.data import load_data

    data = load_data([spec], task="prompt", validation_fraction=0, seed=seed)
    prompts = [r["prompt"] for r in data.train]
    if max_prompts is not None:
        if max_prompts < 1:
            raise ConfigError("--max_prompts must be positive")
        prompts = prompts[:max_prompts]
    return prompts, {"source": spec, "count": len(prompts), "rows_available": len(data.train),
                     "fingerprint": data.report.train_fingerprint}


def _judge_fingerprint(spec: str):
    from reward.generate import model_fingerprint

    head, sep, rest = spec.partition(":")
    target = rest if sep and head in ("rm", "llm", "rule") else spec
    from stages.core.secrets import redact_text

    return {"spec": redact_text(spec), "target": model_fingerprint(target) if Path(target).exists() else None}


def _inputs(argv):
    """Parse, check the judge, load the prompts and name everything the result depends on (no model loads)."""
    from reward.generate import Decoding, model_fingerprint
    from reward.judges import resolve_judge
    from stages.core.fingerprints import reward_source_key

    args = build_parser().parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    if args.n_bootstrap < 1:
        raise ConfigError("--n_bootstrap must be positive")
    decoding = Decoding(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, batch_size=args.batch_size)
    make_judge = resolve_judge(args.judge)  # a bad spec fails now, before any generation
    prompts, prompt_info = load_prompts(args.prompts, seed=args.seed, max_prompts=args.max_prompts)
    S.log(STAGE, f"{len(prompts)} prompts from {args.prompts}")
    components = {"stage": STAGE, "policy": model_fingerprint(args.policy), "reference": model_fingerprint(args.reference),
                  "judge": _judge_fingerprint(args.judge), "prompts": prompt_info["fingerprint"], "n": len(prompts),
                  "decoding": asdict(decoding), "n_bootstrap": args.n_bootstrap,
                  "verifier_code": reward_source_key("demo_verifier")}
    return args, prompts, prompt_info, decoding, make_judge, components


def fingerprint_for(argv) -> tuple[str, dict]:
    from stages.core import fingerprints

    components = _inputs(argv)[-1]
    return fingerprints.of(components), components


def main(argv=None) -> dict:
    """Run the evaluation; returns the report dict (also written to --out)."""
    args, prompts, prompt_info, decoding, make_judge, components = _inputs(argv)
    from stages.core.lifecycle import StageRun
    from stages.core.secrets import redact_text, scrub_argv

    out = Path(args.out).expanduser()
    judge_path = args.judge.partition(":")[2] if args.judge.partition(":")[0] in ("rm", "llm", "rule") else args.judge
    # an evaluation with other inputs replaces the previous one in --out (its generation cache is reused)
    with StageRun(STAGE, output_dir=out, components=components, force=True,
                  inputs=[args.policy, args.reference, judge_path, args.prompts]) as run:
        if run.done and not args.force and (out / "report.json").is_file():
            return json.loads((out / "report.json").read_text())
        return _evaluate(run, args, prompts, prompt_info, decoding, make_judge, redact_text, scrub_argv)


def _evaluate(run, args, prompts, prompt_info, decoding, make_judge, redact_text, scrub_argv) -> dict:
    from reward import report as R
    from reward.generate import cached_generate
    from reward.winrate import compare, is_demo_prompts
    from stages.core import artifacts

    out, fp = run.output_dir, run.fingerprint
    out.mkdir(parents=True, exist_ok=True)
    # a crash below must not leave an old "complete" behind; the folder stays recognisably this stage's
    artifacts.write_json(out / artifacts.MANIFEST, {"status": "running", "stage": STAGE, "fingerprint": fp})
    started = time.time()

    cache = out / "generations"
    gens = {label: cached_generate(path, prompts, decoding, cache_dir=cache, label=label, device=args.device,
                                   log=lambda m: S.log(STAGE, m))
            for label, path in (("policy", args.policy), ("reference", args.reference))}
    for label, g in gens.items():
        if g.truncated_prompts:
            S.log(STAGE, f"{label}: {g.truncated_prompts} prompts longer than the context minus max_new_tokens "
                         "were trimmed from their start")
    judge = make_judge()
    S.log(STAGE, f"judging with {judge.name}")
    demo = args.prompts.startswith("demo:prompts") or is_demo_prompts(prompts)
    result = compare(prompts, gens["policy"].responses, gens["reference"].responses, judge,
                     len_policy=gens["policy"].n_tokens, len_reference=gens["reference"].n_tokens, demo=demo,
                     n_boot=args.n_bootstrap, seed=args.seed)
    stats = result["stats"]
    flag = R.overoptimization(stats.to_dict(), result["verifier"], judge_is_gold=R.is_gold_judge(judge.name))
    report = {
        "policy": str(args.policy), "reference": str(args.reference),
        "judge": {"spec": redact_text(args.judge), "name": redact_text(judge.name)}, "prompts": prompt_info, "decoding": asdict(decoding),
        "bootstrap": {"n_boot": args.n_bootstrap, "seed": args.seed, "level": 0.95},
        "stats": stats.to_dict(), "length_unit": "tokens", "headline": stats.headline(),
        "verifier": result["verifier"], "overoptimization": flag, "judge_details": result["judge_details"],
        "base_comparison": R.model_comparison(artifacts.read_manifest(args.policy) if Path(args.policy).is_dir() else None),
        "generation": {k: {"cached": g.cached, "truncated_prompts": g.truncated_prompts, **g.info} for k, g in gens.items()},
        "per_prompt": result["per_prompt"],
    }
    paths = R.write_report(out, report)
    artifacts.write_json(out / artifacts.MANIFEST, {
        "status": artifacts.COMPLETE, "stage": STAGE, "fingerprint": fp, "inputs": run.components,
        "policy": str(args.policy), "reference": str(args.reference), "judge": redact_text(args.judge), "prompts": prompt_info,
        "metrics": {k: report["stats"][k] for k in ("win_rate", "tie_rate", "interval", "wilson", "bootstrap", "lc_win_rate", "lc_interval") if k in report["stats"]}
        | {"overoptimization_suspected": flag["suspected"]},
        "command": " ".join(scrub_argv(sys.argv)), "packages": artifacts.package_versions(), "git_commit": artifacts.git_commit(),
        "duration_s": round(time.time() - started, 1)})
    S.log(STAGE, stats.headline())
    if result["verifier"]:
        v = result["verifier"]
        S.log(STAGE, f"verifier pass rate: policy {v['policy_pass_rate']:.3f}, reference {v['reference_pass_rate']:.3f}")
    if flag["suspected"]:
        S.log(STAGE, f"WARNING: {R.OVEROPTIMIZATION}: " + "; ".join(flag["reasons"]))
    S.log(STAGE, f"wrote {paths['markdown']}")
    return report


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
