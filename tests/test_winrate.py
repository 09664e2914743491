"""Win-rate statistics (known values, determinism, length control) and the report files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from reward.judges import ScoreJudge
from reward.report import model_comparison, to_markdown, write_report
from reward.winrate import (bootstrap_interval, compare, is_demo_prompts, length_controlled, outcome_interval,
                            summarize, wilson_interval)
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
    assert s.wilson == pytest.approx((0.29999, 0.90323), abs=1e-5)  # Wilson on 4 of 6
    # scores 1,1,.5,.5,0,1: mean 2/3, sample variance (3/9 + 2/36 + 4/9) / 5 = 1/6 -> 2/3 ± 1.96 / 6
    assert s.interval == pytest.approx((2 / 3 - 1.959964 / 6, 2 / 3 + 1.959964 / 6), abs=1e-6)
    assert summarize([0.5] * 100).wilson == pytest.approx((0.4038, 0.5962), abs=1e-4)
    with pytest.raises(ValueError):
        summarize([1, 2])


def test_interval_treats_ties_as_ties_not_coin_flips():
    """24 wins, 40 ties, 0 losses of 64: mean 44/64 = 0.6875; deviations 0.3125 (x24) and 0.1875 (x40)
    give a sample variance of (24 * 0.09765625 + 40 * 0.03515625) / 63 = 3.75 / 63, so the half-width is
    1.959964 * sqrt(3.75 / 63 / 64) = 0.059773. Wilson on 44 of 64 (a tie as a coin flip): 0.5661-0.7877."""
    s = summarize([1.0] * 24 + [0.5] * 40)
    assert s.win_rate == 0.6875
    assert s.interval == pytest.approx((0.627727, 0.747273), abs=1e-6)
    assert s.wilson == pytest.approx((0.566077, 0.787689), abs=1e-6)
    width, wilson_width = s.interval[1] - s.interval[0], s.wilson[1] - s.wilson[0]
    assert width < 0.6 * wilson_width
    assert "95% CI 0.628-0.747" in s.headline()


def test_interval_edge_cases():
    assert all(math.isnan(v) for v in outcome_interval([]))
    assert outcome_interval([1.0] * 10) == pytest.approx((0.7225, 1.0), abs=1e-4)  # no spread: Wilson, not a point
    assert outcome_interval([1.0, 0.0]) == (0.0, 1.0)  # 0.5 ± 1.96 * sqrt(0.5 / 2), clipped


def test_bootstrap_is_deterministic_per_seed_and_brackets_the_mean():
    rng = np.random.default_rng(3)
    x = rng.choice([0.0, 0.5, 1.0], size=80, p=[0.3, 0.2, 0.5])
    a, b = bootstrap_interval(x, seed=7), bootstrap_interval(x, seed=7)
    assert a == b
    assert bootstrap_interval(x, seed=8) != a
    assert a[0] < x.mean() < a[1]
    # close to the normal interval, mean ± 1.96 * sd / sqrt(n), for a sample this size
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert abs(a[0] - (x.mean() - half)) < 0.02 and abs(a[1] - (x.mean() + half)) < 0.02
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
    lo, hi = s.lc_interval
    assert lo < s.lc_win_rate < hi and lo < 0.5 < hi and hi < s.interval[0]  # raw rate is well outside
    assert s.lc_warning is None  # some differences are negative: zero is inside the data


def test_length_control_warns_when_every_difference_has_one_sign():
    out = [1.0, 1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 1.0]
    lr = [10, 20, 30, 40, 50, 60, 70, 80]
    longer = summarize(out, [r + 1 + i for i, r in enumerate(lr)], lr, n_boot=200)
    assert "longer on every prompt" in longer.lc_warning and "extrapolat" in longer.lc_warning
    assert "warning" in longer.headline() and longer.to_dict()["lc_warning"] == longer.lc_warning
    shorter = summarize(out, [r - 1 - i for i, r in enumerate(lr)], lr, n_boot=200)
    assert "shorter on every prompt" in shorter.lc_warning
    mixed = summarize(out, [r + (-1) ** i * 3 for i, r in enumerate(lr)], lr, n_boot=200)
    assert mixed.lc_warning is None
    lo, hi = mixed.lc_interval
    assert 0.0 <= lo <= mixed.lc_win_rate <= hi <= 1.0


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


def _report(with_texts=False):
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
                 "base_comparison": model_comparison(manifest), "per_prompt": res["per_prompt"], "length_unit": "chars"}, \
        *((pol, ref) if with_texts else ())


def test_compare_reports_verifier_pass_rates_and_judge_agreement():
    res, _, pol, ref = _report(with_texts=True)
    assert res["verifier"] == {"policy_pass_rate": 1.0, "reference_pass_rate": 0.0}
    agree = res["judge_details"]["agreement_with_verifier"]
    # the verifier says the policy wins every pair; the by-length judge agrees where the policy is longer
    expected = np.mean([len(a) > len(b) for a, b in zip(pol, ref)])
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
    assert data["stats"]["interval"] == pytest.approx(list(st.interval))
    assert data["stats"]["bootstrap"] == pytest.approx(list(st.bootstrap))
    assert data["stats"]["lc_win_rate"] == pytest.approx(st.lc_win_rate)
    assert data["base_comparison"]["rows"] == [{"metric": "loss", "base": 2.5, "final": 1.25}]
    assert data["verifier"]["policy_pass_rate"] == 1.0 and data["plot"] == "winrate.png"
    md = (out / "report.md").read_text()
    assert f"**{st.win_rate:.3f}**" in md and f"{st.wilson[0]:.3f} – {st.wilson[1]:.3f}" in md
    assert f"**{st.interval[0]:.3f} – {st.interval[1]:.3f}**" in md
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


def test_markdown_of_a_report_written_before_the_headline_interval():
    _, report = _report()
    report["stats"] = {k: v for k, v in report["stats"].items() if k not in ("interval", "lc_interval", "lc_warning")}
    lo, hi = report["stats"]["wilson"]
    assert f"**{lo:.3f} – {hi:.3f}**" in to_markdown(report)
