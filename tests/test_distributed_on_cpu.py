"""SFT, reward and DPO stages under two CPU processes: DDP over gloo (launch/accelerate/cpu_multi.yaml),
DeepSpeed ZeRO-2 and ZeRO-3 (zero2.yaml / zero3.yaml with --num_processes 2), torchrun with a DeepSpeed
JSON, the SLURM script on one machine, and resume under ZeRO-3 + LoRA. Each stage is started the way users start it
(`accelerate launch --config_file ... stages/X.py`). Runs are fp32 with LoRA dropout off, so a
2 x 4 run must equal a 1 x 8 single-process run up to float rounding.

Slow tier: about 14 launches of ~30 s on 2 cores, plus a one-off ~60 s DeepSpeed op build cached in
<cache_dir>/torch_extensions.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthetic import preference_rows, write_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ACCEL = ROOT / "launch/accelerate"
CONFIGS = ["cpu_multi", "zero2", "zero3"]
EXACT = ["--bf16", "false", "--lora_dropout", "0"]  # fp32 and no dropout: comparable across process counts
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
       "PYTHONWARNINGS": "ignore"}
ATOL = 1e-4  # measured: ZeRO-2/DDP 3e-7, ZeRO-3 1.5e-6 max abs difference from one process


def readable(text: str, limit: int = 6000) -> str:
    """The tail of a launch's output without tqdm's redraws, which filled the whole 6,000 characters a failed
    CI run showed and hid the error."""
    lines = (re.sub(r"^.*(?:it/s|s/it)\]|\x1b?\[A", "", line) for line in re.split(r"[\r\n]+", text))
    return "\n".join(line for line in lines if line.strip())[-limit:]  # an error glued to a bar keeps its text


def launch(config: str, script, *args, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / f"{config}.yaml"),
           "--num_processes", "2", "--main_process_port", "0", str(script), *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)}\n{readable(r.stdout, 3000)}\n{readable(r.stderr)}"
    return r


def manifest(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def assert_same_tensors(got: dict, want: dict, atol=ATOL):
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert got[k].shape == w.shape and got[k].numel() > 0, k  # complete, not ZeRO-3's empty partitions
        torch.testing.assert_close(got[k].float(), w.float(), atol=atol, rtol=1e-3, msg=k)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return str(write_jsonl(d / "train.jsonl", preference_rows(64, seed=0))), str(write_jsonl(d / "held.jsonl", preference_rows(16, seed=1)))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


def sft_args(model, out, *extra):
    return ["--config", ROOT / "recipes/tiny/sft.yaml", "--model_name_or_path", model, "--output_dir", out, *EXACT, *extra]


@pytest.fixture(scope="module")
def single(tiny_llama, work):
    """The reference: one process, micro-batch 8 = the 2 x 4 global batch of the launched runs."""
    from stages import sft

    out = work / "sft-single"
    sft.main([str(a) for a in sft_args(tiny_llama, out, "--per_device_train_batch_size", "8")])
    return out


@pytest.fixture(scope="module")
def sft_runs(tiny_llama, work):
    cache = {}

    def run(config):
        if config not in cache:
            out = work / f"sft-{config}"
            launch(config, ROOT / "stages/sft.py", *sft_args(tiny_llama, out))
            cache[config] = out
        return cache[config]

    return run


def test_cpu_multi_config_starts_two_gloo_processes(tmp_path):
    script = tmp_path / "who.py"
    # one file per rank: two processes printing to one pipe can interleave their lines
    script.write_text("import pathlib, sys\nfrom accelerate import PartialState\ns = PartialState(cpu=True)\n"
                      f"pathlib.Path({str(tmp_path)!r}, f'rank{{s.process_index}}.txt').write_text("
                      "f'RANK {s.process_index} {s.num_processes} {s.backend}')\n")
    launch("cpu_multi", script)
    lines = [p.read_text().split() for p in sorted(tmp_path.glob("rank*.txt"))]
    assert sorted(l[1] for l in lines) == ["0", "1"]
    assert all(l[2:] == ["2", "gloo"] for l in lines)


@pytest.mark.parametrize("config", CONFIGS)
def test_sft_lora_equals_the_single_process_run(config, sft_runs, single, tiny_llama):
    from stages.core.policy import load_model

    out = sft_runs(config)
    m, ref = manifest(out), manifest(single)
    assert m["status"] == "complete"
    assert_same_tensors(load_file(str(out / "adapter_model.safetensors")),
                        load_file(str(single / "adapter_model.safetensors")))
    assert abs(m["metrics"]["final"]["eval_loss"] - ref["metrics"]["final"]["eval_loss"]) < 1e-4
    assert abs(m["metrics"]["base"]["base_loss"] - ref["metrics"]["base"]["base_loss"]) < 1e-4
    got = [h["loss"] for h in json.loads((out / "metrics.json").read_text())["log_history"] if "loss" in h]
    want = [h["loss"] for h in json.loads((single / "metrics.json").read_text())["log_history"] if "loss" in h]
    assert got == pytest.approx(want, abs=1e-4)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():  # the saved adapter reloads (merged, the suite's convention) into the same model
        torch.testing.assert_close(load_model(str(out))[0].eval()(input_ids=ids).logits,
                                   load_model(str(single))[0].eval()(input_ids=ids).logits, atol=ATOL, rtol=1e-3)


@pytest.mark.parametrize("config", CONFIGS)
def test_full_reward_model_saves_whole_weights_that_score(config, tiny_llama, data, work):
    from reward.model import load_reward_model
    from transformers import AutoModelForSequenceClassification

    out = work / f"rm-{config}"
    launch(config, ROOT / "stages/rm.py", "--config", ROOT / "recipes/tiny/rm.yaml", "--model_name_or_path", tiny_llama,
           "--output_dir", out, "--datasets", data[0], "--eval_datasets", data[1], "--bf16", "false")
    m = manifest(out)
    assert m["metrics"]["final"]["eval_accuracy"] >= 0.9
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(p.numel() > 0 for p in model.parameters())
    rows = preference_rows(16, seed=1)
    rm = load_reward_model(out)
    chosen = rm.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = rm.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 0.9 * len(rows)


@pytest.mark.parametrize("config", CONFIGS)
def test_dpo_lora_on_the_sft_output(config, sft_runs, data, work):
    sft_out = sft_runs(config)
    out = work / f"dpo-{config}"
    launch(config, ROOT / "stages/dpo.py", "--config", ROOT / "recipes/tiny/dpo.yaml", "--model_name_or_path", sft_out,
           "--output_dir", out, "--datasets", data[0], "--eval_datasets", data[1], "--bf16", "false")
    m = manifest(out)
    assert m["metrics"]["reference"].startswith("adapters disabled = merged")  # the SFT policy, merged under ZeRO-3 too
    start, final = m["metrics"]["start"], m["metrics"]["final"]
    assert start["start_rewards/chosen"] == 0 and start["start_rewards/rejected"] == 0  # policy == reference at start
    assert final["eval_rewards/accuracies"] >= 0.7 and final["eval_rewards/margins"] > 0
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # trained, not the zero init


def test_torchrun_with_the_zero3_json(single, tiny_llama, work):
    """No accelerate env: TrainingArguments reads `--deepspeed`, and ZeRO-3 loading (zero.Init) sees the
    full batch size before the trainer exists: DeepSpeed's comm must already know the world size."""
    out = work / "sft-torchrun-zero3"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "stages/sft.py"), *map(str, sft_args(tiny_llama, out)), "--deepspeed",
           str(ROOT / "launch/deepspeed/zero3.json")]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, readable(r.stderr)
    assert_same_tensors(load_file(str(out / "adapter_model.safetensors")),
                        load_file(str(single / "adapter_model.safetensors")))


CRASH = """
import sys
sys.path.insert(0, {root!r})
from transformers import TrainerCallback
from stages.core.lifecycle import StageRun

class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 4:
            raise SystemExit(3)

_callbacks = StageRun.callbacks
StageRun.callbacks = lambda self: _callbacks(self) + [Crash()]
from stages import sft
sys.exit(sft.cli(sys.argv[1:]))
"""


def test_zero3_lora_resumes_after_a_crash_and_ends_where_an_uninterrupted_run_does(sft_runs, tiny_llama, work, tmp_path):
    crashing = tmp_path / "crash_sft.py"
    crashing.write_text(CRASH.format(root=str(ROOT)))
    out = work / "sft-zero3-resumed"
    r = launch("zero3", crashing, *sft_args(tiny_llama, out), check=False)
    assert r.returncode != 0 and not (out / "manifest.json").exists()
    checkpoints = sorted(p.name for p in (out.parent / f".{out.name}.work" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3"]
    r = launch("zero3", ROOT / "stages/sft.py", *sft_args(tiny_llama, out))
    assert "resuming from" in r.stdout and "checkpoint-3" in r.stdout
    assert manifest(out)["status"] == "complete"
    assert_same_tensors(load_file(str(out / "adapter_model.safetensors")),
                        load_file(str(sft_runs("zero3") / "adapter_model.safetensors")))


def test_slurm_script_runs_two_nodes_on_one_machine(single, tiny_llama, work, tmp_path):
    """launch/slurm/multinode.sbatch with stand-ins for srun/scontrol: 2 'nodes' x 1 process, ZeRO-3."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\npids=()\n'
                                  'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done\n'
                                  'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / "sft-multinode"
    env = {**ENV, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{ENV['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "GPUS_PER_NODE": "1", "MAIN_PORT": str(port), "OMP_NUM_THREADS": "1",
           "ACCELERATE_CONFIG": "launch/accelerate/zero3.yaml"}
    r = subprocess.run(["bash", str(ROOT / "launch/slurm/multinode.sbatch"), "stages/sft.py",
                        *map(str, sft_args(tiny_llama, out))], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, readable(r.stderr)
    assert "[multinode] 2 nodes x 1 GPUs" in r.stdout
    assert_same_tensors(load_file(str(out / "adapter_model.safetensors")),
                        load_file(str(single / "adapter_model.safetensors")))


# ------------------------------------------------------------------------------------------------
# PPO (the suite's own trainer) under DDP, ZeRO-2 and ZeRO-3: one base carries policy, value, reward
# and reference. Held-out replies are greedy, so the starting policy's held-out reward must equal the
# single-process figure: under ZeRO-3 that proves generation gathered the sharded weights correctly.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ppo_rm(tiny_llama, data, work):
    from stages import rm

    out = work / "ppo-rm"
    rm.main([str(a) for a in ["--config", ROOT / "recipes/tiny/rm.yaml", "--model_name_or_path", tiny_llama,
                              "--output_dir", out, "--datasets", data[0], "--eval_datasets", data[1],
                              "--peft_method", "lora", "--max_steps", "2", *EXACT]])
    return out


def ppo_args(model, reward_model, out):
    return ["--config", ROOT / "recipes/tiny/ppo.yaml", "--model_name_or_path", model, "--reward_model", reward_model,
            "--output_dir", out, "--max_steps", "2", "--save_strategy", "no", "--bf16", "false"]


@pytest.fixture(scope="module")
def ppo_single(tiny_llama, ppo_rm, work):
    from stages import ppo

    out = work / "ppo-single"
    ppo.main([str(a) for a in ppo_args(tiny_llama, ppo_rm, out)])
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_ppo_one_base_runs_and_generates_as_one_process_does(config, tiny_llama, ppo_rm, ppo_single, work):
    out = work / f"ppo-{config}"
    launch(config, ROOT / "stages/ppo.py", *ppo_args(tiny_llama, ppo_rm, out))
    got, want = manifest(out), manifest(ppo_single)
    assert got["status"] == "complete" and got["memory_mode"] == "peft"
    start, ref = got["metrics"]["start"], want["metrics"]["start"]
    assert start["mean_length"] == ref["mean_length"] and start["eos_rate"] == ref["eos_rate"]
    assert start["mean_reward"] == pytest.approx(ref["mean_reward"], abs=1e-4)
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert [h["step"] for h in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor([h["objective/kl"], h["loss/value"], h["loss/policy"]])).all() for h in history)
    adapter, ref_adapter = load_file(str(out / "adapter_model.safetensors")), load_file(str(ppo_single / "adapter_model.safetensors"))
    assert adapter.keys() == ref_adapter.keys()
    assert all(adapter[k].shape == ref_adapter[k].shape and adapter[k].numel() > 0 for k in adapter)  # whole, not shards
