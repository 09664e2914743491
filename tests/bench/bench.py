"""Benchmarks: the suite's stages against plain TRL, on one machine, in one run (`make bench`).

    python tests/bench/bench.py                      # SmolLM2-135M-Instruct, the full set (~15 min on 2 cores)
    python tests/bench/bench.py --only matmul,sft    # a subset
    python tests/bench/bench.py --model PATH --steps 4 --ppo-steps 2   # any local model (the tests use a tiny one)

Every measurement runs in a process of its own, so its peak RSS is that process's own maximum resident
set (os.wait4). Step time is the median optimiser step after WARMUP steps; tokens/s counts the non-padding
tokens the trained model's forward passes saw in those steps (the same hook on ours and on TRL's), not
the reference's. MFU = model FLOPs/s over the bf16 matmul peak measured in the same run. Speed ratios
compare runs of this one invocation only: this machine's run-to-run noise is ±15%.
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

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes/smollm2-135m"
WARMUP = 2
RUNS = ["matmul", "sft", "sft-trl", "dpo", "dpo-gc", "dpo-trl", "ppo-onebase", "ppo-full", "full-512"]
PAIRS = {  # ours vs the baseline it is compared with
    "sft": "sft-trl", "dpo": "dpo-trl", "dpo-gc": "dpo-trl", "ppo-onebase": "ppo-full",
}
TARGETS = [  # (what, run, baseline, metric, op, bound)
    ("SFT tokens/s vs plain TRL", "sft", "sft-trl", "tokens_per_s", ">=", 1.5),
    ("DPO step time vs TRL + separate reference", "dpo", "dpo-trl", "step_s", "<=", 0.7),
    ("DPO peak RSS vs TRL + separate reference", "dpo", "dpo-trl", "peak_rss_gb", "<=", 0.6),
    ("DPO, gradient checkpointing on: step time vs TRL", "dpo-gc", "dpo-trl", "step_s", "<=", 0.7),
    ("DPO, gradient checkpointing on: peak RSS vs TRL", "dpo-gc", "dpo-trl", "peak_rss_gb", "<=", 0.6),
    ("full fine-tuning MFU at length 512 (of bf16 peak)", "full-512", None, "mfu", ">=", 0.40),
]


# ---------------------------------------------------------------------------------------------------
# measurement helpers, used inside the worker processes
# ---------------------------------------------------------------------------------------------------
def matmul_flops(model) -> tuple[int, int, int]:
    """(weights in matmuls, layers, hidden size); a tied LM head counts once, as the matmul it is."""
    import torch

    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    cfg = model.config
    return n, getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0)


def flops_per_token(n_matmul: int, layers: int, hidden: int, seq: float, passes: float) -> float:
    """Forward FLOPs per token (2 per weight, plus causal attention's ~2·L·d·S) times passes (3 full, 2 LoRA)."""
    return passes * (2.0 * n_matmul + 2.0 * layers * hidden * seq)


class StepTimer:
    """A Trainer callback: wall time of each optimiser step, tokens the trained model's forwards saw."""

    def __init__(self):
        self.times, self.tokens, self.seqs, self._t0, self._tok = [], [], [], 0.0, 0
        self.model_shape = None
        self.trainable = self.total = 0

    # transformers calls these by name; subclassing TrainerCallback is not required
    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kw):
        import torch

        base = model
        while hasattr(base, "module") and not hasattr(base, "config"):
            base = base.module
        inner = base.get_base_model() if hasattr(base, "get_base_model") else base
        self.model_shape = matmul_flops(inner)
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in model.parameters())

        def count(_m, _args, kwargs):
            if not torch.is_grad_enabled():
                return  # reference / evaluation forwards
            mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
            if mask is not None and mask.dim() == 2:
                self._tok += int(mask.sum())
                self.seqs.append(float(mask.sum(1).float().mean()))
            elif ids is not None:
                self._tok += ids.numel()
                pos = kwargs.get("position_ids")
                n_seq = int((pos == 0).sum()) if pos is not None else ids.shape[0]
                self.seqs.append(ids.numel() / max(n_seq, 1))

        inner.register_forward_pre_hook(count, with_kwargs=True)

    def on_step_begin(self, *a, **k):
        self._t0, self._tok = time.perf_counter(), 0

    def on_step_end(self, *a, **k):
        self.times.append(time.perf_counter() - self._t0)
        self.tokens.append(self._tok)

    def summary(self, passes: float) -> dict:
        t, tok = self.times[WARMUP:] or self.times, self.tokens[WARMUP:] or self.tokens
        n, layers, hidden = self.model_shape
        seq = statistics.mean(self.seqs) if self.seqs else 0.0
        tps = sum(tok) / sum(t)
        return {"steps": len(self.times), "timed_steps": len(t), "step_s": statistics.median(t),
                "tokens_per_s": tps, "tokens_per_step": sum(tok) / len(tok), "mean_seq_len": seq, "trainable_params": self.trainable,
                "total_params": self.total,
                "flops_per_token": flops_per_token(n, layers, hidden, seq / 2, passes), "matmul_params": n}


def patch_stage_callbacks(timer):
    """Add the timer to the callbacks our stages build (the stages themselves are unchanged)."""
    from stages.core import stage as S

    original = S.callbacks
    S.callbacks = lambda args: original(args) + [timer]


def common_overrides(out: Path, steps: int) -> list[str]:
    return ["--output_dir", str(out), "--max_steps", str(steps), "--eval_strategy", "no", "--save_strategy", "no",
            "--logging_steps", "1", "--eval_datasets", "[]", "--validation_fraction", "0", "--report_to", "none",
            "--force", "true", "--seed", "0", "--early_stopping_patience", "0"]


def cpu_kw() -> dict:
    import torch

    return {} if torch.cuda.is_available() else {"use_cpu": True}


def lora_config(recipe: str):
    """The LoRA of our recipe, so the baseline trains exactly the same adapter."""
    import yaml
    from peft import LoraConfig

    r = yaml.safe_load((RECIPES / recipe).read_text())
    return LoraConfig(r=r["lora_r"], lora_alpha=r["lora_alpha"], lora_dropout=r["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")


def long_conversations(path: Path, min_chars: int = 3000) -> str:
    """Multi-turn conversations of >= ~600 tokens, built from the demo rows (for sequence length 512)."""
    from stages.core import demo

    rows, conv = [], []
    for ex in demo.sft_examples():
        conv += ex["messages"]
        if sum(len(m["content"]) for m in conv) >= min_chars:
            rows.append({"messages": conv})
            conv = []
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------------
# workers: each returns a dict of figures
# ---------------------------------------------------------------------------------------------------
def w_matmul(spec) -> dict:
    import torch

    torch.manual_seed(0)
    out = {"threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in spec["matmul_sizes"]:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)
            for _ in range(spec["matmul_repeats"]):
                reps, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < 0.5:
                    torch.mm(a, b)
                    reps += 1
                best = max(best, 2.0 * n ** 3 * reps / (time.perf_counter() - t0))
        out[f"{name}_flops"] = best
    return out


def w_sft(spec, *, full512: bool = False) -> dict:
    from stages import sft

    timer = StepTimer()
    patch_stage_callbacks(timer)
    argv = ["--config", str(RECIPES / "sft.yaml"), "--model_name_or_path", spec["model"],
            "--compare_with_base", "false", *common_overrides(Path(spec["tmp"]) / "out", spec["steps"])]
    if full512:  # full fine-tuning on multi-turn rows cut to exactly 512 tokens (no padding)
        data = long_conversations(Path(spec["tmp"]) / "long.jsonl")
        argv += ["--peft_method", "full", "--datasets", data, "--max_length", "512",
                 "--per_device_train_batch_size", str(spec["full_batch"]), "--learning_rate", "1e-5"]
    sft.main(argv)
    return timer.summary(passes=3.0 if full512 else 2.0)


def demo_rows(kind: str, n: int | None = None):
    from datasets import Dataset

    from stages.core import demo

    rows = demo.sft_examples() if kind == "sft" else demo.preference_pairs()
    return Dataset.from_list(rows[:n] if n else rows)


def w_sft_trl(spec) -> dict:
    """Plain TRL: SFTTrainer with TRL's defaults; only what must match (model, data, steps, batch, LoRA) is set."""
    from trl import SFTConfig, SFTTrainer

    from stages.core.models import resolve_model

    timer = StepTimer()
    cfg = SFTConfig(output_dir=str(Path(spec["tmp"]) / "out"), max_steps=spec["steps"], per_device_train_batch_size=8,
                    learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to="none", seed=0, **cpu_kw())
    trainer = SFTTrainer(model=resolve_model(spec["model"]), args=cfg, train_dataset=demo_rows("sft"),
                         peft_config=lora_config("sft.yaml"), callbacks=[timer])
    trainer.train()
    return timer.summary(passes=2.0)


def w_dpo(spec, *, checkpointing: bool = False) -> dict:
    """Our DPO stage as users run it; `checkpointing` trades ~30% more compute for activations' memory."""
    from stages import dpo

    timer = StepTimer()
    patch_stage_callbacks(timer)
    dpo.main(["--config", str(RECIPES / "dpo.yaml"), "--model_name_or_path", spec["model"], "--max_train_rows", "256",
              *common_overrides(Path(spec["tmp"]) / "out", spec["steps"]),
              *(["--gradient_checkpointing", "true"] if checkpointing else [])])
    return timer.summary(passes=3.0)  # policy forward + backward (2) + the reference's forward (1)


def w_dpo_trl(spec) -> dict:
    """Plain TRL DPO with a separate reference model: the policy gets the same LoRA, the reference is a second copy."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from stages.core.models import resolve_model

    path = resolve_model(spec["model"])
    timer = StepTimer()
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(path), lora_config("dpo.yaml"))
    reference = AutoModelForCausalLM.from_pretrained(path)
    cfg = DPOConfig(output_dir=str(Path(spec["tmp"]) / "out"), max_steps=spec["steps"], per_device_train_batch_size=8,
                    learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", seed=0, **cpu_kw())
    trainer = DPOTrainer(model=policy, ref_model=reference, args=cfg, train_dataset=demo_rows("preference", 256),
                         processing_class=AutoTokenizer.from_pretrained(path), callbacks=[timer])
    trainer.train()
    return timer.summary(passes=3.0)


def w_rm_for_ppo(spec) -> dict:
    from stages import rm

    rm.main(["--config", str(RECIPES / "rm.yaml"), "--model_name_or_path", spec["model"],
             *common_overrides(Path(spec["shared"]) / "rm", 2)])
    return {}


class UpdateTimer:
    """PPO callback: wall time between updates, and the trainer's own token rates."""

    def __init__(self):
        self.marks, self.logs = [time.perf_counter()], []

    def on_update_end(self, trainer, update, logs):
        self.marks.append(time.perf_counter())
        self.logs.append(logs)


def w_ppo(spec, *, mode: str) -> dict:
    from stages import ppo

    timer = UpdateTimer()
    argv = ["--config", str(RECIPES / "ppo.yaml"), "--model_name_or_path", spec["model"],
            "--reward_model", str(Path(spec["shared"]) / "rm"), "--output_dir", str(Path(spec["tmp"]) / "out"),
            "--max_steps", str(spec["ppo_steps"]), "--rollout_batch_size", "8", "--per_device_train_batch_size", "4",
            "--max_new_tokens", "32", "--eval_datasets", "[]", "--save_strategy", "no", "--report_to", "none",
            "--force", "true"]
    if mode == "full":
        argv += ["--peft_method", "full", "--learning_rate", "1e-6"]
    ppo.main(argv, callbacks=[timer])
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    timed = steps[1:] or steps
    gen = statistics.median(l["gen_tokens_per_second"] for l in timer.logs)
    train = statistics.median(l["train_tokens_per_second"] for l in timer.logs)
    return {"steps": len(steps), "timed_steps": len(timed), "step_s": statistics.median(timed),
            "tokens_per_s": train, "gen_tokens_per_s": gen, "mode": mode}


WORKERS = {"matmul": w_matmul, "sft": w_sft, "sft-trl": w_sft_trl, "dpo": w_dpo, "dpo-trl": w_dpo_trl,
           "dpo-gc": lambda s: w_dpo(s, checkpointing=True),
           "rm-for-ppo": w_rm_for_ppo, "ppo-onebase": lambda s: w_ppo(s, mode="onebase"),
           "ppo-full": lambda s: w_ppo(s, mode="full"), "full-512": lambda s: w_sft(s, full512=True)}


def worker_main(name: str, spec_path: str, result_path: str) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(ROOT))
    spec = json.loads(Path(spec_path).read_text())
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        spec["tmp"] = tmp
        result = WORKERS[name](spec)
    Path(result_path).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------
# the parent: run each worker in its own process, then report
# ---------------------------------------------------------------------------------------------------
def run_worker(name: str, spec: dict, workdir: Path, log) -> dict:
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    logfile = workdir / f"{name}.log"
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


def table(results: dict, targets: list[dict]) -> str:
    lines = []
    mm = results.get("matmul")
    if mm:
        lines.append(f"matmul peak ({mm['threads']} threads): fp32 {mm['fp32_flops'] / 1e9:,.0f} GFLOP/s, "
                     f"bf16 {mm['bf16_flops'] / 1e9:,.0f} GFLOP/s")
    head = f"{'run':<12} {'step s':>8} {'tokens/s':>9} {'peak RSS GB':>12} {'MFU':>6}  vs baseline"
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
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        lines.append(f"{name:<12} {r['step_s']:>8.2f} {r['tokens_per_s']:>9.1f} {r['peak_rss_gb']:>12.2f} {mfu:>6}  {rel}")
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
    ap.add_argument("--only", default=",".join(RUNS), help=f"comma-separated subset of: {', '.join(RUNS)}")
    ap.add_argument("--out", default="runs/bench/bench.json", help="where the JSON report goes")
    ap.add_argument("--worker", nargs=3, metavar=("NAME", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker_main(*a.worker)
        return 0
    only = [s.strip() for s in a.only.split(",") if s.strip()]
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
    add_mfu(results)
    targets = check_targets(results)
    import torch

    report = {"model": a.model, "steps": a.steps, "warmup_steps": WARMUP, "torch": torch.__version__,
              "cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "total_s": time.perf_counter() - t0,
              "command": "python tests/bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": results, "targets": targets}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    print(table(results, targets))
    print(f"\n(JSON: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
