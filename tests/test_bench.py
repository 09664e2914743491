"""`make bench` end to end on a tiny model: every run measured in its own process, table and JSON agree."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_measures_every_run_and_reports_ratios_and_targets(tiny_llama, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "tests/bench/bench.py", "--model", str(tiny_llama), "--steps", "4",
                        "--ppo-steps", "2", "--full-batch", "2", "--repeats", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    report = json.loads(out.read_text())
    res = report["results"]
    assert set(res) == {"matmul", "sft", "sft-trl", "dpo", "dpo-gc", "dpo-trl", "ppo-onebase", "ppo-onebase-all-logits",
                        "ppo-full", "full-512", "full-512-compile", "full-512-pure-bf16", "sft-real", "sft-real-no-compact-head", "sft-real-no-bf16-weights",
                        "sft-real-no-grouping", "sft-real-no-checkpointing", "sft-real-return-freed-memory",
                        "sft-real-trl", "rm-real", "rm-real-return-freed-memory", "rm-real-trl", "dpo-real", "dpo-real-trl"}
    # the real-length rows: every run saw fewer non-padding tokens per step than batch x max_length, and the
    # report quotes their length distribution
    for name, cap in (("sft-real", 4 * 512), ("sft-real-trl", 4 * 512), ("rm-real", 8 * 2 * 384)):
        assert 0 < res[name]["tokens_per_step"] <= cap, name
    assert {"median", "p90", "over_512"} <= set(report["workload_lengths"]["sft"])
    assert report["workload_lengths"]["sft"]["rows"] == 4 * 4  # one epoch of the measured steps: 4 x batch 4
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
    # the printed table and the JSON agree (the ratio arithmetic itself: test_targets_by_hand)
    assert f"{'met ' if sft['met'] else 'MISS'} SFT tokens/s vs plain TRL: {sft['value']:.2f} (target >= 1.5)" in r.stdout
    assert "bf16" in r.stdout
    # the SFT pair deciding the tightest speed target ran twice each: the median, and the higher peak RSS
    for name in ("sft-real", "sft-real-trl"):
        reps = res[name]["repeats"]
        assert len(reps) == 2 and (tmp_path / "logs" / f"{name}-2.log").exists()
        assert res[name]["tokens_per_s"] == pytest.approx((reps[0]["tokens_per_s"] + reps[1]["tokens_per_s"]) / 2)
        assert res[name]["peak_rss_gb"] == max(x["peak_rss_gb"] for x in reps)
    assert "repeats" not in res["rm-real"] and "median of 2 runs" in r.stdout


def _bench_module(monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "tests/bench"))  # bench.py imports its sibling `workers`

    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "tests/bench/bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repeats_merge_into_the_median_speed_and_the_highest_memory(monkeypatch):
    bench = _bench_module(monkeypatch)
    runs = [{"step_s": 3.0, "tokens_per_s": 200.0, "peak_rss_gb": 2.2, "trainable_params": 7},
            {"step_s": 4.0, "tokens_per_s": 150.0, "peak_rss_gb": 2.5, "trainable_params": 7},
            {"step_s": 2.5, "tokens_per_s": 240.0, "peak_rss_gb": 2.1, "trainable_params": 7}]
    merged = bench.merge_repeats(runs)
    assert (merged["step_s"], merged["tokens_per_s"], merged["peak_rss_gb"]) == (3.0, 200.0, 2.5)
    assert merged["trainable_params"] == 7 and [r["tokens_per_s"] for r in merged["repeats"]] == [200.0, 150.0, 240.0]


def test_targets_by_hand(monkeypatch):
    """Hand-made figures: 300 / 200 tokens/s = 1.50 meets ">= 1.5"; DPO 3 s / 5 s = 0.60 meets "<= 0.7" and
    3.5 GB / 5 GB = 0.70 misses "<= 0.6"; a run without its baseline gives no target; MFU 2e9 x 100 / 1e12 = 0.2."""
    bench = _bench_module(monkeypatch)
    results = {"matmul": {"bf16_flops": 1e12}, "sft": {"tokens_per_s": 300.0}, "sft-trl": {"tokens_per_s": 200.0},
               "dpo": {"step_s": 3.0, "peak_rss_gb": 3.5}, "dpo-trl": {"step_s": 5.0, "peak_rss_gb": 5.0},
               "full-512": {"flops_per_token": 2e9, "tokens_per_s": 100.0}}
    bench.add_mfu(results)
    assert results["full-512"]["mfu"] == pytest.approx(0.2)
    got = {t["target"]: (round(t["value"], 6), t["met"]) for t in bench.check_targets(results)}
    assert got == {"SFT tokens/s vs plain TRL": (1.5, True),
                   "DPO step time vs TRL + separate reference": (0.6, True),
                   "DPO peak RSS vs TRL + separate reference": (0.7, False),
                   "full fine-tuning MFU at length 512 (of bf16 peak)": (0.2, False)}
