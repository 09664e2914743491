"""tests/gpu/check.sh --cpu-dry-run: the GPU check's own code runs on CPU and prints its one table.

The GPU rows themselves run only on a lent GPU machine (see the top of tests/gpu/check.sh); here every
check that has a CPU path must pass, and the CUDA-only ones must say so instead of failing.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAN_ON_CPU = ["packages", "sft stage, tiny llama, bf16", "padding-free = padded loss, SDPA",
              "TRL fused LM head = plain log-softmax", "ppo stage update, tiny llama"]
CUDA_ONLY = ["sft stage, SmolLM2-135M-shaped, bf16", "padding-free = padded loss, flash_attention_2",
             "compact CPU head steps aside on CUDA (SFT, 2 steps)", "QLoRA 4-bit peak GPU memory < LoRA",
             "DeepSpeed ZeRO-3, one process (torchrun)"]


def table_rows(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == "| check | result | figure |", stdout[-2000:]
    rows = {}
    for line in lines[1:]:
        name, result, figure = (cell.strip() for cell in line.strip("|").split(" | ", 2))
        rows[name] = (result, figure)
    return rows


def test_cpu_dry_run_passes_every_cpu_check_and_skips_the_cuda_only_ones(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    proc = subprocess.run(["bash", str(ROOT / "tests/gpu/check.sh"), "--cpu-dry-run", "--work-dir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert list(rows) == ["packages", "sft stage, tiny llama, bf16", "sft stage, SmolLM2-135M-shaped, bf16",
                          "padding-free = padded loss, SDPA", "padding-free = padded loss, flash_attention_2",
                          "TRL fused LM head = plain log-softmax", "compact CPU head steps aside on CUDA (SFT, 2 steps)",
                          "ppo stage update, tiny llama", "QLoRA 4-bit peak GPU memory < LoRA",
                          "DeepSpeed ZeRO-3, one process (torchrun)"]
    for name in RAN_ON_CPU:
        assert rows[name][0] == "ok", (name, rows[name])
    for name in CUDA_ONLY:
        assert rows[name] == ("skipped: no CUDA", ""), (name, rows[name])
    assert rows["packages"][1].startswith("CPU; torch ")
    assert "padding_free=False" in rows["sft stage, tiny llama, bf16"][1]  # the CPU default: padded batches
    assert "|diff|" in rows["padding-free = padded loss, SDPA"][1]


def test_a_failing_check_makes_the_run_fail_and_shows_in_the_table(tmp_path):
    """Without --cpu-dry-run on a machine with no GPU, the packages row fails and the exit status says so."""
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path),
           "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels")}  # a developer's fetched .whl/ is for the GPU machine
    proc = subprocess.run(["bash", str(ROOT / "tests/gpu/check.sh"), "--only", "packages"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    result, figure = table_rows(proc.stdout)["packages"]
    assert result == "FAIL" and "no CUDA device" in figure
    assert (tmp_path / "gpu-check.md").read_text().startswith("| check | result | figure |")
