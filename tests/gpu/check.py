"""GPU check: the GPU paths the CPU test suite reaches only up to the GPU boundary, in one table.

    python tests/gpu/check.py                 # on a CUDA machine (tests/gpu/check.sh brings the wheels)
    python tests/gpu/check.py --cpu-dry-run   # here: the same code on CPU, CUDA-only rows skipped

Each check returns a figure or raises: `Skip` gives "skipped: ...", anything else "FAIL: ...". The exit
status is 1 when any row failed. Tiny models are built locally (tests/tiny_models.py); the "real-sized"
rows use a randomly initialised SmolLM2-135M-shaped model, so no download is needed (the GPU machine is
offline). Speed and memory figures are printed, never asserted, except that QLoRA must peak below LoRA.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REQUIRED = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
OPTIONAL = ("bitsandbytes", "deepspeed", "flash_attn")
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, vocab_size=49152)


class Skip(Exception):
    """A check that cannot run here: no CUDA, or an optional package is not installed."""


CHECKS = []


def check(name):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


class Context:
    def __init__(self, work: Path, dry_run: bool):
        import torch

        self.work, self.dry_run = work, dry_run
        self.cuda = torch.cuda.is_available()
        self._models = {}

    def need_cuda(self):
        if not self.cuda:
            raise Skip("no CUDA")

    @staticmethod
    def need_package(name):
        import importlib.util

        if importlib.util.find_spec(name) is None:
            raise Skip("not installed")

    def tiny(self, arch="llama", **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in self._models:
            from tiny_models import save_tiny

            self._models[key] = save_tiny(self.work / f"tiny-{arch}-{len(self._models)}", arch, **kw)
        return self._models[key]

    def smollm2_sized(self) -> Path:
        """A random model with SmolLM2-135M's shape and the tiny tokenizer (token ids stay < 400)."""
        if "smollm2" not in self._models:
            import torch
            from transformers import AutoModelForCausalLM, LlamaConfig

            from tiny_models import build_tokenizer

            out = self.work / "smollm2-135m-shaped"
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(LlamaConfig(bos_token_id=0, eos_token_id=2, pad_token_id=3,
                                                                 **SMOLLM2_135M))
            model.save_pretrained(out)
            build_tokenizer().save_pretrained(out)
            self._models["smollm2"] = out
        return self._models["smollm2"]

    def reset_peak(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20


def run_stage(module, argv):
    """Run a stage in this process; returns its manifest."""
    import importlib

    out = Path(argv[argv.index("--output_dir") + 1])
    importlib.import_module(f"stages.{module}").main(argv)
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest.get("status") != "complete":
        raise AssertionError(f"{module} manifest status {manifest.get('status')!r}")
    return manifest


def sft_argv(model, out, *extra):
    return ["--config", str(ROOT / "recipes/tiny/sft.yaml"), "--model_name_or_path", str(model),
            "--output_dir", str(out), "--max_steps", "4", "--eval_steps", "2", "--save_strategy", "no",
            "--report_to", "none", *extra]


def _encoded(tokenizer, counts=(1, 5, 9, 14)):
    """A few chat rows of different lengths, encoded by the SFT stage's own encoder (input_ids, labels)."""
    from datasets import Dataset

    from stages.core.encode import encode_sft

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "hi " * n},
                                            {"role": "assistant", "content": "ok yes " * (n + 1)}]} for n in counts])
    return encode_sft(rows, tokenizer, max_length=None)[0]


def _padded_rows(tokenizer):
    return list(_encoded(tokenizer))


# ---------------------------------------------------------------- checks


@check("packages")
def packages(ctx):
    import importlib
    import importlib.metadata as md

    versions, missing = [], []
    for name in REQUIRED + OPTIONAL:
        try:
            importlib.import_module(name)
            versions.append(f"{name} {md.version(name.replace('_', '-'))}")
        except Exception as exc:  # an optional package may fail to import for its own reasons too
            if name in REQUIRED:
                missing.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0][:160])
    if missing:
        raise AssertionError("; ".join(missing))
    import torch

    device = torch.cuda.get_device_name(0) if ctx.cuda else "CPU"
    if not ctx.cuda and not ctx.dry_run:
        raise AssertionError("torch sees no CUDA device (use --cpu-dry-run on a machine without one)")
    return f"{device}; " + ", ".join(versions)


@check("sft stage, tiny llama, bf16")
def sft_tiny(ctx):
    ctx.reset_peak()
    start = time.perf_counter()
    m = run_stage("sft", sft_argv(ctx.tiny(), ctx.work / "sft-tiny"))
    seconds = time.perf_counter() - start
    derived, metrics = m["derived"], m["metrics"]
    if derived["device"] != ("cuda" if ctx.cuda else "cpu"):
        raise AssertionError(f"stage ran on {derived['device']}")
    if ctx.cuda and not (derived["bf16"] and m["config"]["training"]["padding_free"]):
        raise AssertionError(f"CUDA defaults not chosen: bf16={derived['bf16']}, "
                             f"padding_free={m['config']['training']['padding_free']}")
    base, final = metrics["base"]["base_loss"], metrics["final"]["eval_loss"]
    if not final < base:
        raise AssertionError(f"eval loss did not fall: {base:.4f} -> {final:.4f}")
    peak = ctx.peak_mib()
    return (f"eval loss {base:.3f} -> {final:.3f}, bf16={derived['bf16']}, "
            f"padding_free={m['config']['training']['padding_free']}, {seconds:.1f} s"
            + (f", peak {peak:.0f} MiB" if peak is not None else ""))


@check("sft stage, SmolLM2-135M-shaped, bf16")
def sft_real_sized(ctx):
    ctx.need_cuda()
    ctx.reset_peak()
    start = time.perf_counter()
    m = run_stage("sft", sft_argv(ctx.smollm2_sized(), ctx.work / "sft-135m", "--max_steps", "10",
                                  "--per_device_train_batch_size", "8", "--max_length", "512"))
    seconds = time.perf_counter() - start
    history = json.loads((ctx.work / "sft-135m" / "metrics.json").read_text()).get("log_history", [])
    speed = next((h["train_samples_per_second"] for h in reversed(history) if "train_samples_per_second" in h), None)
    return (f"10 steps, batch 8: {seconds:.1f} s for the whole stage, peak {ctx.peak_mib():.0f} MiB"
            + (f", {speed:.1f} samples/s in training" if speed else "") + f", bf16={m['derived']['bf16']}")


def _padding_free_losses(ctx, attn, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    path = ctx.tiny("llama", hidden=64)
    device = "cuda" if ctx.cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype).to(device).eval()
    rows = _padded_rows(tok)
    losses = {}
    for free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=free)(rows)
        if ("attention_mask" in batch) is free:
            raise AssertionError("collator did not build the batch kind asked for")
        keep = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
        with torch.no_grad():
            losses[free] = model(**keep, use_cache=False).loss.float().item()
    return losses


def _compare_padding_free(ctx, attn):
    import torch

    figures = []
    dtypes = [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)] if ctx.cuda else [(torch.float32, 1e-4)]
    for dtype, tol in dtypes:
        losses = _padding_free_losses(ctx, attn, dtype)
        diff = abs(losses[True] - losses[False])
        name = str(dtype).removeprefix("torch.")
        if diff > tol * max(1.0, abs(losses[False])):
            raise AssertionError(f"{name}: padding-free loss {losses[True]:.6f} != padded {losses[False]:.6f}")
        figures.append(f"{name} |diff| {diff:.1e}")
    return f"loss {losses[False]:.4f}; " + ", ".join(figures) + ("" if ctx.cuda else " (CPU)")


@check("padding-free = padded loss, SDPA")
def padding_free_sdpa(ctx):
    return _compare_padding_free(ctx, "sdpa")


@check("padding-free = padded loss, flash_attention_2")
def padding_free_flash(ctx):
    ctx.need_cuda()
    ctx.need_package("flash_attn")
    return _compare_padding_free(ctx, "flash_attention_2")


@check("TRL fused LM head = plain log-softmax")
def trl_head(ctx):
    """TRL's own kernel (Triton on CUDA, its torch fallback on CPU) against log-softmax of the full logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    path = ctx.tiny("llama", hidden=64)
    device = "cuda" if ctx.cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(path)
    plain = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    fused = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    add_fused_lm_head(fused, outputs=("log_probs", "entropy"))
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(_padded_rows(tok))
    ids, attn, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        out = fused(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        logits = plain(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    mask = labels[:, 1:] != -100
    want = logits.log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    diff = (out.log_probs[mask].float() - want[mask]).abs().max().item()
    if diff > 5e-3:  # fp32 both ways; a wrong shift or token would differ by ~1
        raise AssertionError(f"max |log-prob diff| {diff:.2e}")
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    ediff = (out.entropy[mask].float() - entropy[mask]).abs().max().item()
    if ediff > 5e-3:
        raise AssertionError(f"max |entropy diff| {ediff:.2e}")
    return f"{int(mask.sum())} tokens, max |diff| log-prob {diff:.1e}, entropy {ediff:.1e} ({device})"


@check("compact CPU head steps aside on CUDA (SFT, 2 steps)")
def head_steps_aside(ctx):
    """Under the SFT stage's fastpath.during_init, a CUDA model keeps TRL's forward and trains through it."""
    ctx.need_cuda()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stages.core import fastpath

    path = ctx.tiny("llama", hidden=64)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to("cuda" if ctx.cuda else "cpu")
    rows = _encoded(tok)
    cfg = SFTConfig(output_dir=str(ctx.work / "head-aside"), bf16=True, max_steps=2, per_device_train_batch_size=4,
                    report_to=[], save_strategy="no", logging_steps=1, padding_free=True, max_length=None,
                    use_cpu=not ctx.cuda)
    with fastpath.during_init(SFTTrainer, bf16=True):
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=rows, processing_class=tok)
    if getattr(trainer.model, "_rlhf_compact_lm_head", False):
        raise AssertionError("the compact CPU head was installed on a CUDA model")
    request = fastpath.trl_request(trainer.model.forward)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if not losses or not all(loss == loss and loss < 1e4 for loss in losses):
        raise AssertionError(f"losses {losses}")
    return (f"TRL forward kept ({'fused, outputs ' + ','.join(request['outputs']) if request else 'not fused'}); "
            f"losses {', '.join(f'{x:.3f}' for x in losses)}")


def share_of_e(prompt, response, **_):
    """The toy PPO reward of tests/test_ppo_stage.py: varies between responses, so an update has a gradient."""
    return response.count("e") / max(1, len(response))


@check("ppo stage update, tiny llama")
def ppo_update(ctx):
    ctx.reset_peak()
    out = ctx.work / "ppo-tiny"
    start = time.perf_counter()
    m = run_stage("ppo", ["--config", str(ROOT / "recipes/tiny/ppo.yaml"), "--model_name_or_path", str(ctx.tiny()),
                          "--output_dir", str(out), "--reward", '{"verifier": "check:share_of_e"}', "--max_steps", "2",
                          "--num_ppo_epochs", "1", "--save_strategy", "no", "--report_to", "none"])
    seconds = time.perf_counter() - start
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    if [h.get("step") for h in history if "objective/kl" in h][:2] != [1, 2]:
        raise AssertionError(f"expected 2 logged updates, got {[h.get('step') for h in history]}")
    if m["derived"]["device"] != ("cuda" if ctx.cuda else "cpu"):
        raise AssertionError(f"stage ran on {m['derived']['device']}")
    if not history[-1]["objective/kl"] != 0:  # the first update moved the policy away from its reference
        raise AssertionError("the policy did not move in the first update (kl to the reference is 0)")
    peak = ctx.peak_mib()
    return (f"2 updates in {seconds:.1f} s, kl {history[-1]['objective/kl']:.3f}"
            + (f", peak {peak:.0f} MiB" if peak is not None else ""))


@check("QLoRA 4-bit peak GPU memory < LoRA")
def qlora_memory(ctx):
    ctx.need_cuda()
    ctx.need_package("bitsandbytes")
    peaks = {}
    for method in ("lora", "qlora"):
        ctx.reset_peak()
        run_stage("sft", sft_argv(ctx.smollm2_sized(), ctx.work / f"sft-{method}", "--peft_method", method,
                                  "--max_steps", "3", "--eval_strategy", "no", "--per_device_train_batch_size", "8"))
        peaks[method] = ctx.peak_mib()
    if not peaks["qlora"] < peaks["lora"]:
        raise AssertionError(f"qlora peak {peaks['qlora']:.0f} MiB >= lora {peaks['lora']:.0f} MiB")
    return f"qlora {peaks['qlora']:.0f} MiB vs lora {peaks['lora']:.0f} MiB ({peaks['qlora'] / peaks['lora']:.2f}x)"


@check("DeepSpeed ZeRO-3, one process (torchrun)")
def zero3(ctx):
    ctx.need_cuda()
    ctx.need_package("deepspeed")
    out = ctx.work / "sft-zero3"
    argv = sft_argv(ctx.tiny(), out, "--deepspeed", str(ROOT / "launch/deepspeed/zero3.json"), "--max_steps", "3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "stages/sft.py"), *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    seconds = time.perf_counter() - start
    (ctx.work / "zero3.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise AssertionError(f"exit {proc.returncode}: {tail[-300:]}")
    m = json.loads((out / "manifest.json").read_text())
    if m.get("status") != "complete":
        raise AssertionError(f"manifest status {m.get('status')!r}")
    return f"complete in {seconds:.1f} s, eval loss {m['metrics']['final'].get('eval_loss', float('nan')):.3f}"


# ---------------------------------------------------------------- table


def run_checks(ctx, only=None, table_path=None):
    """Run the checks in order; the table at `table_path` is rewritten after each row, so a run stopped
    at its time limit still leaves the rows it finished."""
    rows = []
    for name, fn in CHECKS:
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        start = time.perf_counter()
        try:
            result, figure = "ok", fn(ctx)
        except Skip as skip:
            result, figure = f"skipped: {skip}", ""
        except Exception as exc:  # one broken check must not hide the rest of the table
            traceback.print_exc()
            result, figure = "FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        rows.append((name, result, figure, time.perf_counter() - start))
        print(f"[gpu-check] {name}: {result} ({rows[-1][3]:.1f} s)", file=sys.stderr, flush=True)
        if table_path:
            Path(table_path).write_text(format_table(rows) + "\n")
    return rows


def format_table(rows) -> str:
    lines = ["| check | result | figure |", "|---|---|---|"]
    lines += [f"| {name} | {result} | {figure} |" for name, result, figure, _ in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="hide any GPU and run every check that runs on CPU")
    ap.add_argument("--only", nargs="*", help="run only the checks whose names contain one of these words")
    ap.add_argument("--work-dir", help="where models and stage outputs go (default: a temporary directory)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--table", help="also write the table to this file, rewritten after each row")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for path in (str(HERE), str(HERE.parent), str(ROOT)):  # the PPO toy reward, tiny_models, `stages`
        if path not in sys.path:
            sys.path.insert(0, path)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run_checks(Context(work, args.cpu_dry_run), args.only, args.table)
    table = format_table(rows)
    print(table, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([dict(check=n, result=r, figure=f, seconds=round(s, 1))
                                               for n, r, f, s in rows], indent=1))
    return 1 if any(r == "FAIL" for _, r, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
