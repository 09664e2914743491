"""`rlhf run CHAIN.yaml`: run stages in order, each reading earlier stages' outputs.

A chain recipe:

    run_dir: runs/smollm2-135m-demo
    launch_config: null            # accelerate config for every training stage (e.g. launch/accelerate/zero3.yaml)
    stages:
      sft: {stage: sft, recipe: sft.yaml}
      rm:  {stage: rm,  recipe: rm.yaml,  with: {model_name_or_path: {from: sft}}}
      dpo: {stage: dpo, recipe: dpo.yaml, with: {model_name_or_path: {from: sft}}}
      eval: {stage: evaluate, with: {policy: {from: dpo}, reference: {from: sft}, judge: {from: rm}}}

Every stage writes to RUN_DIR/NAME (a plain folder name inside run_dir). Before a stage starts its
inputs are checked (complete, same chat template). A stage is skipped only when its own fingerprint
(recipe values, data content, chat template, reward code, parent fingerprints: computed without
loading a model) equals its finished output's; an edited dataset, template, verifier or base model
re-runs it and, through the parent fingerprints, everything after it. An interrupted stage resumes from
its last checkpoint (the stage does that itself). One chain at a time per run_dir (a lock).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import registry
from .core import artifacts
from .core.errors import ConfigError
from .core.safety import Lock, check_stage_name
from .core.secrets import scrub_argv

ROOT = Path(__file__).resolve().parents[1]
TRAINING_STAGES = set(registry.names("training"))
EVAL_STAGES = set(registry.names("evaluation"))
STAGE_KEYS = {"stage", "recipe", "with"}


def load_chain(path: str | Path) -> dict:
    """Read and validate a chain recipe; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"chain recipe not found: {path}")
    try:
        chain = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    unknown = set(chain) - {"run_dir", "launch_config", "stages", "description", "num_processes"}
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (expected run_dir, launch_config, stages)")
    stages = chain.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{path}: stages: a mapping of stage names to {{stage, recipe, with}}")
    seen: list[str] = []
    run_dir = Path(chain.get("run_dir") or f"runs/{path.stem}")
    for name, spec in stages.items():
        where = f"{path}: stages.{name}"
        check_stage_name(name, run_dir if run_dir.is_absolute() else Path.cwd() / run_dir, where)
        if not isinstance(spec, dict) or "stage" not in spec:
            raise ConfigError(f"{where}: needs 'stage' (one of {', '.join(sorted(TRAINING_STAGES | EVAL_STAGES))})")
        if set(spec) - STAGE_KEYS:
            raise ConfigError(f"{where}: unknown key '{sorted(set(spec) - STAGE_KEYS)[0]}' (expected stage, recipe, with)")
        if spec["stage"] not in TRAINING_STAGES | EVAL_STAGES:
            raise ConfigError(f"{where}.stage: unknown stage '{spec['stage']}'")
        if spec["stage"] in TRAINING_STAGES and not spec.get("recipe"):
            raise ConfigError(f"{where}.recipe: a training stage needs a stage recipe")
        if spec.get("recipe"):
            spec["recipe"] = str((path.parent / spec["recipe"]).resolve())
            if not Path(spec["recipe"]).is_file():
                raise ConfigError(f"{where}.recipe: not found: {spec['recipe']}")
        for key, value in (spec.get("with") or {}).items():
            if isinstance(value, dict) and "from" in value and value["from"] not in seen:
                raise ConfigError(f"{where}.with.{key}: 'from: {value['from']}' must name an earlier stage ({', '.join(seen) or 'none'})")
        seen.append(name)
    chain["path"] = str(path.resolve())
    chain.setdefault("run_dir", f"runs/{path.stem}")
    return chain


def resolve(value, run_dir: Path):
    """Replace {from: NAME} references by the earlier stage's output directory."""
    if isinstance(value, dict) and set(value) == {"from"}:
        return str(run_dir / value["from"])
    return value


def chat_template_of(path: Path) -> str | None:
    f = path / "chat_template.jinja"
    if f.is_file():
        return f.read_text()
    cfg = path / "tokenizer_config.json"
    return json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None


def check_inputs(name: str, spec: dict, run_dir: Path) -> list[Path]:
    """Inputs from earlier stages must be complete and share one chat template."""
    inputs = []
    for key, value in (spec.get("with") or {}).items():
        if isinstance(value, dict) and "from" in value:
            p = run_dir / value["from"]
            if not artifacts.is_complete(p):
                raise ConfigError(f"stage '{name}': input {key} = {p} is not a complete stage output; run '{value['from']}' first")
            inputs.append(p)
    templates = {str(p): chat_template_of(p) for p in inputs}
    distinct = {t for t in templates.values() if t is not None}
    if len(distinct) > 1:
        raise ConfigError(f"stage '{name}': inputs use different chat templates ({', '.join(templates)}); "
                          "a chain must keep one template from SFT on")
    return inputs


def command_for(name: str, spec: dict, chain: dict, run_dir: Path) -> list[str]:
    out = run_dir / name
    overrides = {k: resolve(v, run_dir) for k, v in (spec.get("with") or {}).items()}
    flags = []
    for k, v in overrides.items():
        flags.append(f"--{k}")
        flags.extend(v if isinstance(v, list) and all(isinstance(x, str) for x in v) else
                     [json.dumps(v) if isinstance(v, (dict, list)) else str(v)])
    if spec["stage"] in EVAL_STAGES:
        return [sys.executable, "-m", f"stages.{spec['stage']}", "--out", str(out), *flags]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if chain.get("launch_config"):
        launch += ["--config_file", str((Path(chain["path"]).parent / chain["launch_config"]).resolve())
                   if not Path(chain["launch_config"]).is_absolute() else chain["launch_config"]]
    else:
        launch += ["--num_processes", str(chain.get("num_processes", 1)), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"]
    script = ROOT / "stages" / f"{spec['stage']}.py"
    return [*launch, str(script), "--config", spec["recipe"], "--output_dir", str(out), *flags]


def stage_argv(cmd: list[str]) -> list[str]:
    """The stage's own arguments inside its launch command (what its fingerprint is computed from)."""
    for i, word in enumerate(cmd):
        if word in ("--config", "--out"):
            return cmd[i:]
    return cmd


def decide(name: str, spec: dict, cmd: list[str], out: Path) -> tuple[bool, str]:
    """(run?, why): skipped only when the stage's fingerprint equals its finished output's."""
    from .core import fingerprints
    from .core.lifecycle import fingerprint_of

    fp, components = fingerprint_of(spec["stage"], stage_argv(cmd))
    m = artifacts.read_manifest(out)
    if m is None:
        return True, "not built yet"
    if m.get("status") != artifacts.COMPLETE:
        return True, "interrupted: resumes from its last checkpoint made from the same inputs"
    if m.get("fingerprint") == fp:
        return False, "complete and unchanged"
    return True, "inputs changed: " + ", ".join(fingerprints.changed(m.get("inputs"), components))


def run_chain(path: str | Path, *, dry_run: bool = False, only: list[str] | None = None) -> dict:
    """Run (or skip) every stage in order. Returns {stage: "skipped"|"ran"|"planned"}."""
    chain = load_chain(path)
    run_dir = Path(chain["run_dir"])
    if not run_dir.is_absolute():
        run_dir = (Path.cwd() / run_dir).resolve()
    if dry_run:
        return _run(chain, run_dir, dry_run=True, only=only)
    run_dir.mkdir(parents=True, exist_ok=True)
    with Lock(run_dir / ".chain.lock", f"run_dir {run_dir}"):
        return _run(chain, run_dir, dry_run=False, only=only)


def _run(chain: dict, run_dir: Path, *, dry_run: bool, only) -> dict:
    results: dict[str, str] = {}
    chain_start = time.time()
    names = list(chain["stages"])
    for i, name in enumerate(names, 1):
        spec = chain["stages"][name]
        if only and name not in only:
            continue
        tag = f"[chain {i}/{len(names)}] {name}"
        upstream = [v["from"] for v in (spec.get("with") or {}).values()
                    if isinstance(v, dict) and "from" in v and results.get(v["from"]) == "planned"]
        out = run_dir / name
        cmd = command_for(name, spec, chain, run_dir)
        if upstream:  # a dry run cannot fingerprint a stage whose parent is not built yet
            print(f"{tag}: would run (after {', '.join(upstream)})", flush=True)
            results[name] = "planned"
            continue
        check_inputs(name, spec, run_dir)
        run, why = decide(name, spec, cmd, out)
        if not run:
            print(f"{tag}: {why}, skipped", flush=True)
            results[name] = "skipped"
            continue
        if out.exists() or (out.parent / f".{out.name}.work").exists():
            cmd += ["--force"] if spec["stage"] in EVAL_STAGES else ["--force", "true"]  # replaces only this stage's own output
        print(f"{tag}: {'would run' if dry_run else 'runs'} ({why}): {shlex.join(scrub_argv(cmd))}", flush=True)
        if dry_run:
            results[name] = "planned"
            continue
        t0 = time.time()
        print(f"{tag}: started at {time.strftime('%H:%M:%S')} ({_elapsed(t0 - chain_start)} into the chain)", flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(cmd, env=env, cwd=os.getcwd())
        if proc.returncode != 0:
            raise ConfigError(f"stage '{name}' failed (exit {proc.returncode}); fix the problem and re-run: "
                              "finished stages are skipped and this one resumes from its last checkpoint")
        print(f"{tag}: finished in {_elapsed(time.time() - t0)} ({_elapsed(time.time() - chain_start)} into the chain)", flush=True)
        results[name] = "ran"
    return results


def _elapsed(seconds: float) -> str:
    from .core.progress import format_duration

    return format_duration(seconds)


DEMO_CHAINS = {"dpo": ROOT / "recipes/smollm2-135m/sft-rm-dpo.yaml", "ppo": ROOT / "recipes/smollm2-135m/sft-rm-ppo.yaml"}


def cli(argv=None) -> int:
    """rlhf run [CHAIN.yaml] [--chain dpo|ppo] [--dry-run] [--only NAME ...]"""
    import argparse

    from .core.errors import UserError

    p = argparse.ArgumentParser(prog="rlhf run", description="Run a chain of stages; no argument runs the built-in demo.")
    p.add_argument("chain_file", nargs="?", help="chain recipe (default: the built-in SmolLM2 demo chain)")
    p.add_argument("--chain", choices=sorted(DEMO_CHAINS), default="dpo", help="which demo chain (without CHAIN.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print what would run")
    p.add_argument("--only", nargs="+", help="run only these stages (inputs must exist)")
    p.add_argument("--verbose", action="store_true", help="show every third-party warning (stages inherit it)")
    a = p.parse_args(argv)
    from .core import noise

    noise.install(a.verbose or noise.verbose_requested())
    path = a.chain_file or DEMO_CHAINS[a.chain]
    t0 = time.time()
    try:
        run_chain(path, dry_run=a.dry_run, only=a.only)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not a.dry_run:
        print(f"[chain] finished in {(time.time() - t0) / 60:.1f} min", flush=True)
        summary = summarize(path)
        if summary:
            print(summary, flush=True)
        print(f"[chain] report: {write_chain_report(path)}", flush=True)
    return 0


def write_chain_report(path) -> str:
    """report.html for the whole run dir (stages/report.py); a failure is said, never fatal to a finished chain."""
    from .report import write_report

    try:
        return str(write_report(Path(load_chain(path)["run_dir"]).resolve()))
    except Exception as e:  # the stages are finished and intact whatever happens here
        return f"not written ({e})"


def summarize(path) -> str | None:
    """The closing table of a chain: verifier pass rates per model, reward-model accuracy, win rates."""
    chain = load_chain(path)
    run_dir = Path(chain["run_dir"]).resolve()
    pass_rates: dict[str, float] = {}
    lines = []
    for name, spec in chain["stages"].items():
        if spec["stage"] == "rm":
            met = (artifacts.read_manifest(run_dir / name) or {}).get("metrics") or {}
            fin, st = met.get("final") or {}, met.get("start") or {}
            if "eval_accuracy" in fin:
                lines.append(f"| reward model '{name}' held-out pair accuracy | {st.get('start_accuracy', float('nan')):.3f} "
                             f"untrained -> {fin['eval_accuracy']:.3f} |")
        if spec["stage"] in ("ppo", "grpo", "rloo"):
            guards = ((artifacts.read_manifest(run_dir / name) or {}).get("metrics") or {}).get("guards") or {}
            gold = guards.get("gold") or {}
            if gold.get("best_gold_score") is not None:
                picked = guards.get("selected_update", guards.get("selected_step"))
                lines.append(f"| {name}: output chosen by the gold judge | step {picked} (gold {gold['best_gold_score']:.3f}, "
                             f"start {gold['start_gold_score']:.3f})"
                             f"{'; stopped early: ' + guards['stopped_early'] if guards.get('stopped_early') else ''} |")
        if spec["stage"] not in EVAL_STAGES or not (run_dir / name / "report.json").is_file():
            continue
        report = json.loads((run_dir / name / "report.json").read_text())
        w = spec.get("with") or {}
        label = {k: (w[k]["from"] if isinstance(w.get(k), dict) else f"base ({w.get(k)})") for k in ("policy", "reference")}
        ver = report.get("verifier") or {}
        for side in ("reference", "policy"):
            if ver.get(f"{side}_pass_rate") is not None:
                pass_rates.setdefault(label[side], ver[f"{side}_pass_rate"])
        st = report.get("stats") or {}
        if st:
            lo, hi = st.get("interval") or st["wilson"]
            lines.append(f"| win rate {label['policy']} vs {label['reference']} (judge {report['judge']['name']}) | "
                         f"{st['win_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}; ties {st['tie_rate']:.3f}, n={st['n']}) |")
            if st.get("lc_win_rate") is not None:
                lci = st.get("lc_interval") or (float("nan"), float("nan"))
                lines.append(f"| same, length-controlled | {st['lc_win_rate']:.3f} (95% CI {lci[0]:.3f}-{lci[1]:.3f})"
                             f"{'; ' + st['lc_warning'] if st.get('lc_warning') else ''} |")
            from reward.report import OVEROPTIMIZATION, is_gold_judge, overoptimization

            gold_judge = is_gold_judge(report["judge"]["name"])
            flag = report.get("overoptimization") or overoptimization(st, ver, judge_is_gold=gold_judge)
            if flag.get("gold") and not gold_judge:
                lines.append(f"| same, gold judge ({flag['gold']['metric']}) | {flag['gold']['policy']:.3f} vs "
                             f"{flag['gold']['reference']:.3f} |")
            if flag.get("suspected"):
                lines.append(f"| **{OVEROPTIMIZATION}** | " + "; ".join(flag["reasons"]) + " |")
    if not lines and not pass_rates:
        return None
    table = ["| result | value |", "|---|---|"]
    table += [f"| verifier pass rate: {model} | {rate:.3f} |" for model, rate in pass_rates.items()]
    return "\n".join(table + lines)
