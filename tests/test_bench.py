"""`make bench` end to end on a tiny model: every run measured in its own process, table and JSON agree."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_bench_measures_every_run_and_reports_ratios_and_targets(tiny_llama, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "tests/bench/bench.py", "--model", str(tiny_llama), "--steps", "4",
                        "--ppo-steps", "2", "--full-batch", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    report = json.loads(out.read_text())
    res = report["results"]
    assert set(res) == {"matmul", "sft", "sft-trl", "dpo", "dpo-gc", "dpo-trl", "ppo-onebase",
                        "ppo-full", "full-512", "sft-real", "sft-real-no-compact-head", "sft-real-no-bf16-weights",
                        "sft-real-no-grouping", "sft-real-no-checkpointing", "sft-real-trl", "rm-real", "rm-real-trl",
                        "dpo-real", "dpo-real-trl"}
    # the real-length rows: every run saw fewer non-padding tokens per step than batch x max_length, and the
    # report quotes their length distribution
    for name, cap in (("sft-real", 4 * 512), ("sft-real-trl", 4 * 512), ("rm-real", 8 * 2 * 384)):
        assert 0 < res[name]["tokens_per_step"] <= cap, name
    assert {"median", "p90", "over_512"} <= set(report["workload_lengths"]["sft"])
    assert "real-length SFT peak RSS vs plain TRL" in {t["target"] for t in report["targets"]}
    assert res["matmul"]["bf16_flops"] > 0 and res["matmul"]["fp32_flops"] > 0
    for name, fig in res.items():
        if name != "matmul":
            assert fig["step_s"] > 0 and fig["tokens_per_s"] > 0 and fig["peak_rss_gb"] > 0.1, name
    for name in ("sft", "sft-trl", "dpo", "dpo-gc", "dpo-trl", "full-512"):
        assert res[name]["timed_steps"] == 4 - 2 and 0 < res[name]["mfu"] < 1, name
    # LoRA: only adapters train in ours and in TRL's; full fine-tuning trains every weight
    assert res["sft"]["trainable_params"] == res["sft-trl"]["trainable_params"]
    assert res["full-512"]["trainable_params"] == res["full-512"]["total_params"]
    assert res["sft"]["trainable_params"] < res["sft"]["total_params"] / 2
    assert res["full-512"]["tokens_per_step"] == 2 * 512  # two rows of exactly 512 tokens per step
    by_target = {t["target"]: t for t in report["targets"]}
    sft = by_target["SFT tokens/s vs plain TRL"]
    assert sft["value"] == pytest.approx(res["sft"]["tokens_per_s"] / res["sft-trl"]["tokens_per_s"])
    assert sft["met"] == (sft["value"] >= 1.5)
    assert "SFT tokens/s vs plain TRL" in r.stdout and "bf16" in r.stdout
