"""Win-rate statistics (known values, determinism, length control) and the report files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from reward.judges import ScoreJudge
from reward.report import model_comparison, to_markdown, write_report
from reward.winrate import (bootstrap_interval, compare, is_demo_prompts, length_controlled, summarize,
                            wilson_interval)
from stages.core import demo


@pytest.mark.parametrize("wins,n,expected", [
    (50, 100, (0.4038, 0.5962)),
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
])
def test_wilson_interval_known_values(wins, n, expected):
    lo, hi = wilson_interval(wins, n)
    assert (round(lo, 4), round(hi, 4)) == expected


def test_wilson_bounds_invert_the_score_test():
    """Each bound p solves |p_hat - p| = z * sqrt(p (1 - p) / n) (the definition, not the closed form)."""
    for wins, n in ((81, 263), (7.5, 20), (3, 40)):
        p_hat = wins / n
        for p in wilson_interval(wins, n):
            assert abs(p_hat - p) == pytest.approx(1.959964 * math.sqrt(p * (1 - p) / n), abs=1e-6)


def test_ties_count_half_and_are_reported_separately():
    s = summarize([1, 1, 0.5, 0.5, 0, 1])
    assert (s.wins, s.ties, s.losses, s.n) == (3, 2, 1, 6)
    assert s.win_rate == pytest.approx(4 / 6) and s.tie_rate == pytest.approx(2 / 6)
    assert s.loss_rate == pytest.approx(1 / 6)
    assert s.wilson == wilson_interval(4, 6)
    assert summarize([0.5] * 100).wilson == pytest.approx(wilson_interval(50, 100))
    with pytest.raises(ValueError):
        summarize([1, 2])


def test_bootstrap_is_deterministic_per_seed_and_brackets_the_mean():
    rng = np.random.default_rng(3)
    x = rng.choice([0.0, 0.5, 1.0], size=80, p=[0.3, 0.2, 0.5])
    a, b = bootstrap_interval(x, seed=7), bootstrap_interval(x, seed=7)
    assert a == b
    assert bootstrap_interval(x, seed=8) != a
    assert a[0] < x.mean() < a[1]
    # close to the Wilson interval for a sample this size
    w = wilson_interval(x.sum(), len(x))
    assert abs(a[0] - w[0]) < 0.05 and abs(a[1] - w[1]) < 0.05
    assert summarize(x, seed=7).bootstrap == a


def _length_biased(n=600, seed=0):
    """The judge only rewards length: P(policy wins) = sigmoid(diff / 5); the policy is usually longer."""
    rng = np.random.default_rng(seed)
    ref = rng.integers(20, 80, n)
    diff = np.round(rng.normal(12, 10, n))
    p_win = 1 / (1 + np.exp(-diff / 5))
    u = rng.random(n)
    out = np.where(u < p_win, 1.0, 0.0)
    out[np.abs(diff) < 1] = 0.5  # equal lengths: a tie
    return out, ref + diff, ref


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    out, lp, lr = _length_biased()
    s = summarize(out, lp, lr)
    assert s.win_rate > 0.75  # raw: longer answers win
    assert abs(s.lc_win_rate - 0.5) < 0.08, s.lc_win_rate  # at equal length there is no preference
    assert s.length_slope > 1.0
    assert s.mean_len_policy > s.mean_len_reference + 10


def test_length_control_keeps_a_real_quality_gap():
    rng = np.random.default_rng(1)
    n = 500
    lr = rng.integers(20, 80, n)
    lp = lr + np.round(rng.normal(0, 10, n))
    out = np.where(rng.random(n) < 0.8, 1.0, 0.0)  # better regardless of length
    s = summarize(out, lp, lr)
    assert abs(s.lc_win_rate - s.win_rate) < 0.05 and s.lc_win_rate > 0.7


def test_length_control_without_length_variation_is_the_raw_rate():
    fit = length_controlled([1, 0, 1, 0.5], [10] * 4, [8] * 4)
    assert fit["win_rate"] == pytest.approx(0.625) and fit["slope"] == 0.0
    assert summarize([1, 0]).lc_win_rate is None  # no lengths, no length control


class _ByLength:
    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]


def _report():
    rows = demo.load("preference_eval")[:10]
    prompts = [r["prompt"] for r in rows]
    pol = [r["chosen"][0]["content"] for r in rows]
    ref = [r["rejected"][0]["content"] for r in rows]
    res = compare(prompts, pol, ref, ScoreJudge(_ByLength(), name="by-length"), len_policy=[len(p) for p in pol],
                  len_reference=[len(r) for r in ref], demo=True, n_boot=500, seed=1)
    manifest = {"metrics": {"base": {"base_loss": 2.5, "base_runtime": 1.0, "epoch": 1},
                            "final": {"eval_loss": 1.25, "eval_runtime": 1.0}}}
    return res, {"policy": "runs/x/dpo", "reference": "runs/x/sft", "judge": {"spec": "by-length", "name": "by-length"},
                 "prompts": {"source": "demo:preference_eval", "count": 10}, "bootstrap": {"n_boot": 500, "seed": 1},
                 "decoding": {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 0},
                 "stats": res["stats"].to_dict(), "verifier": res["verifier"], "judge_details": res["judge_details"],
                 "base_comparison": model_comparison(manifest), "per_prompt": res["per_prompt"], "length_unit": "chars"}


def test_compare_reports_verifier_pass_rates_and_judge_agreement():
    res, _ = _report()
    assert res["verifier"] == {"policy_pass_rate": 1.0, "reference_pass_rate": 0.0}
    agree = res["judge_details"]["agreement_with_verifier"]
    expected = np.mean([r["outcome"] == 1.0 for r in res["per_prompt"]])  # verifier says the policy wins every pair
    assert agree == pytest.approx(expected) and res["judge_details"]["verifier_decisive_pairs"] == 10
    row = res["per_prompt"][0]
    assert row["score_policy"] == len(row["policy"]) and row["result"] in ("win", "tie", "loss")
    assert is_demo_prompts([r["prompt"] for r in demo.load("prompts")[:5]])
    assert not is_demo_prompts(["What is 2 + 2?"])


def test_report_files_exist_and_hold_the_numbers(tmp_path):
    res, report = _report()
    paths = write_report(tmp_path / "out", report)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "winrate.png", "per_prompt.jsonl"}
    assert set(paths) == {"json", "markdown", "plot", "per_prompt"}
    data = json.loads((out / "report.json").read_text())
    st = res["stats"]
    assert data["stats"]["win_rate"] == pytest.approx(st.win_rate)
    assert data["stats"]["wilson"] == pytest.approx(list(st.wilson))
    assert data["stats"]["bootstrap"] == pytest.approx(list(st.bootstrap))
    assert data["stats"]["lc_win_rate"] == pytest.approx(st.lc_win_rate)
    assert data["base_comparison"]["rows"] == [{"metric": "loss", "base": 2.5, "final": 1.25}]
    assert data["verifier"]["policy_pass_rate"] == 1.0 and data["plot"] == "winrate.png"
    md = (out / "report.md").read_text()
    assert f"**{st.win_rate:.3f}**" in md and f"{st.wilson[0]:.3f} – {st.wilson[1]:.3f}" in md
    assert "| loss | 2.5000 | 1.2500 |" in md and "Verifier pass rate" in md and "![win rate](winrate.png)" in md
    assert (out / "winrate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "per_prompt.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[3])["index"] == 3
    assert not list(out.glob(".*tmp*"))  # nothing half-written left behind


def test_markdown_escapes_table_breaking_text():
    _, report = _report()
    report["per_prompt"][0]["policy"] = "a | b\nc `d`"
    md = to_markdown(report)
    assert "a \\| b c \\`d\\`" in md


def test_model_comparison_uses_start_metrics_when_there_is_no_base():
    m = {"metrics": {"start": {"start_loss": 0.69, "start_rewards/accuracies": 0.5},
                     "final": {"eval_loss": 0.4, "eval_rewards/accuracies": 0.9}}}
    cmp_ = model_comparison(m)
    assert cmp_["against"] == "start" and {r["metric"] for r in cmp_["rows"]} == {"loss", "rewards/accuracies"}
    assert model_comparison({"metrics": {}}) is None and model_comparison(None) is None
    assert math.isnan(summarize([]).win_rate)
