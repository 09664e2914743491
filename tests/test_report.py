"""Curated curves, report.html (also in a real headless Chromium), runs/compare, progress estimates."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stages import report as R
from stages import runs as RUNS
from stages.core import plots
from stages.core.progress import Progress, progress_line

SFT_HISTORY = [
    {"loss": 2.0, "learning_rate": 1e-3, "grad_norm": 1.0, "num_tokens": 100.0, "epoch": 0.1, "step": 1},
    {"loss": 1.8, "learning_rate": 8e-4, "epoch": 0.2, "step": 2},
    {"eval_loss": 1.9, "eval_runtime": 0.2, "eval_model_preparation_time": 0.001, "eval_samples_per_second": 9.0, "step": 2},
    {"loss": 1.5, "learning_rate": 6e-4, "step": 4},
    {"eval_loss": 1.6, "eval_runtime": 0.2, "eval_model_preparation_time": 0.001, "step": 4},
    {"loss": 1.4, "learning_rate": 4e-4, "step": 6},
    {"eval_loss": 1.7, "eval_runtime": 0.2, "eval_model_preparation_time": 0.001, "step": 6},
    {"train_runtime": 3.0, "train_samples_per_second": 5.0, "train_loss": 1.7, "total_flos": 1.0, "step": 6},
]
SFT_METRICS = {"base": {"base_loss": 2.1, "base_runtime": 1.0}, "final": {"eval_loss": 1.7, "eval_runtime": 0.1}}


def axes_by_title(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_sft_curves_put_both_losses_on_one_panel_with_the_base_line_and_the_best_step():
    fig = plots.build_figure(SFT_HISTORY, stage="sft", metrics=SFT_METRICS)
    panels = axes_by_title(fig)
    assert list(panels) == ["Loss (train and validation)", "Learning rate"]  # no bookkeeping panels, no train_loss dot
    loss = panels["Loss (train and validation)"]
    lines = {line.get_label(): line for line in loss.get_lines()}
    assert list(lines["train"].get_xdata()) == [1, 2, 4, 6] and list(lines["validation"].get_ydata()) == [1.9, 1.6, 1.7]
    best = next(line for label, line in lines.items() if label.startswith("best"))
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([4], [1.6])  # the lowest validation loss, not the last
    base = next(line for label, line in lines.items() if label.startswith("base model"))
    assert set(base.get_ydata()) == {2.1}  # a horizontal line at the base model's validation loss
    assert "nats/token" in loss.get_ylabel() and loss.get_xlabel() == "optimizer step"


def test_reward_model_accuracy_and_margin_are_set_against_the_untrained_start():
    history = [{"accuracy": 0.5, "margin": 0.1, "loss": 0.7, "step": 1}, {"accuracy": 0.7, "margin": 0.4, "loss": 0.6, "step": 2},
               {"eval_accuracy": 0.8, "eval_margin": 0.5, "eval_loss": 0.55, "step": 2}]
    metrics = {"start": {"start_accuracy": 0.45, "start_margin": -0.01, "start_loss": 0.69}}
    panels = axes_by_title(plots.build_figure(history, stage="rm", metrics=metrics))
    accuracy = next(ax for title, ax in panels.items() if title.startswith("Pair accuracy"))
    start = next(line for line in accuracy.get_lines() if line.get_label().startswith("untrained start"))
    assert set(start.get_ydata()) == {0.45}
    assert any(title.startswith("Reward margin") for title in panels)


def test_preference_stages_show_accuracy_margin_and_chosen_rejected_log_probs():
    history = [{"rewards/accuracies": a, "rewards/margins": m, "logps/chosen": -50 + s, "logps/rejected": -50 - s,
                "loss": 0.69 - s / 100, "logits/chosen": 0.1, "step": s} for s, a, m in ((1, 0.5, 0.0), (2, 0.7, 0.2), (3, 0.9, 0.5))]
    for stage in ("dpo", "kto", "orpo"):
        panels = axes_by_title(plots.build_figure(history, stage=stage))
        assert "Implicit-reward accuracy" in panels and "Implicit-reward margin (chosen - rejected)" in panels
        assert labels(panels["Log-probabilities of the responses"]) == ["chosen (train)", "rejected (train)"]
        assert not any("logits" in title for title in panels)


def test_rl_curves_show_reward_kl_length_clipping_and_held_out_gold_score_when_logged():
    history = [{"objective/reward": 0.1 * u, "objective/score": 0.2 * u, "objective/kl": 0.01 * u, "response/length": 8 + u,
                "policy/clipfrac": 0.1, "gen_tokens_per_second": 100.0, "step": u} for u in (1, 2, 3)]
    without = axes_by_title(plots.build_figure(history, stage="ppo"))
    assert set(without) == {"Reward (training rollouts)", "KL to the reference", "Response length", "Clip fraction"}
    held_out = [{"step": u, "heldout_reward": 0.3 * u, "gold_score": 0.2 - 0.05 * u, "kl_to_reference": 0.1 * u,
                 "response_length": 9.0} for u in (1, 3)]
    fig = plots.build_figure(history + held_out, stage="ppo")
    panels = axes_by_title(fig)
    assert "KL to the reference (held-out)" in panels
    heldout_axis = panels["Held-out reward and gold score"]
    twin = [ax for ax in fig.axes if ax is not heldout_axis and ax.get_ylabel() == "gold score"]
    assert len(twin) == 1 and list(twin[0].get_lines()[0].get_ydata()) == pytest.approx([0.15, 0.05])
    assert list(heldout_axis.get_lines()[0].get_xdata()) == [1, 3] and heldout_axis.get_xlabel() == "PPO update"
    grpo = [{"reward": 0.1, "kl": 0.0, "completions/mean_length": 8.0, "clip_ratio/region_mean": 0.0, "step": s} for s in (1, 2)]
    assert set(axes_by_title(plots.build_figure(grpo, stage="grpo"))) == set(without)


def test_unknown_stages_fall_back_on_what_they_logged_and_classification_plugs_in():
    preference = [{"rewards/margins": 0.1 * s, "rewards/accuracies": 0.5, "step": s} for s in (1, 2)]
    assert plots.panels_for("online_whatever", preference) is plots.PREFERENCE
    assert plots.panels_for("new_stage", SFT_HISTORY) is plots.GENERIC
    history = SFT_HISTORY + [{"eval_macro_f1": f, "step": s} for s, f in ((2, 0.4), (4, 0.6))]
    panels = axes_by_title(plots.build_figure(history, stage="classify", metrics={"base": {"base_macro_f1": 0.3, "base_loss": 2.1}}))
    f1 = panels["Validation macro-F1"]
    assert any(set(line.get_ydata()) == {0.3} for line in f1.get_lines())


def test_plot_curves_writes_nothing_when_only_bookkeeping_was_logged(tmp_path):
    only_bookkeeping = [{"train_runtime": 1.0, "train_loss": 0.5, "step": 3}, {"eval_runtime": 0.1, "step": 3}]
    assert plots.plot_curves(only_bookkeeping, tmp_path / "c.png", stage="sft") is None
    assert not (tmp_path / "c.png").exists()
    assert plots.plot_curves(SFT_HISTORY, tmp_path / "c.png", stage="sft", metrics=SFT_METRICS).read_bytes()[:4] == b"\x89PNG"


# -- progress -----------------------------------------------------------------------------------------------------
class State:
    def __init__(self, step, max_steps):
        self.global_step, self.max_steps, self.is_world_process_zero = step, max_steps, True


def test_time_left_comes_from_the_steps_this_run_made():
    clock = iter([100.0, 110.0, 110.0, 130.0])
    lines = []
    progress = Progress(lines.append, clock=lambda: next(clock))
    progress.on_train_begin(None, State(10, 100), None)  # resumed at step 10: those steps took no time here
    progress.on_log(None, State(20, 100), None, logs={"loss": 1.0})
    progress.on_log(None, State(20, 100), None, logs={"eval_loss": 1.0})  # same step: no second line
    assert lines == ["step 20/100 (20%), 1.00 s/step, about 80 s left"]
    progress.on_log(None, State(40, 100), None, logs={"loss": 1.0})
    assert lines[-1] == "step 40/100 (40%), 1.00 s/step, about 60 s left"
    assert progress_line(5, 0, 0, 3.0) is None
    assert progress_line(30, 50, 0, 300.0) == "step 30/50 (60%), 10.00 s/step, about 3.3 min left"


def test_ppo_updates_get_the_same_estimate():
    class Trainer:
        total_updates = 10

    clock = iter([0.0, 4.0])
    lines = []
    progress = Progress(lines.append, clock=lambda: next(clock))
    progress.on_update_end(Trainer(), 1, {})  # the first update starts the clock
    progress.on_update_end(Trainer(), 3, {})
    assert lines == ["update 3/10 (30%), 2.00 s/update, about 14 s left"]


# -- report.html ----------------------------------------------------------------------------------------------------
SECRET = "hf_" + "A" * 34
PER_PROMPT = [
    {"index": 0, "prompt": "Describe Peru.", "policy": "Peru is a country in South America.", "reference": "Peru.",
     "outcome": 1.0, "result": "win", "score_policy": 1.25, "score_reference": 0.5},
    {"index": 1, "prompt": "Say hi <b>bold</b>", "policy": "<script>document.title='pwned'</script>hi",
     "reference": "Hello there!", "outcome": 0.0, "result": "loss", "score_policy": -0.5, "score_reference": 0.75},
    {"index": 2, "prompt": "Name a fruit.", "policy": f"kiwi {SECRET}", "reference": "A kiwi.", "outcome": 0.5,
     "result": "tie", "score_policy": 0.1, "score_reference": 0.1},
]


def make_stage(path: Path, stage: str, *, parent: str, metrics: dict, history=None, config=None, data=None, finished="2026-01-01T00:00:00Z"):
    path.mkdir(parents=True)
    manifest = {"status": "complete", "stage": stage, "fingerprint": f"fp-{path.name}", "base_model": "tiny-base",
                "parent": {"path": parent}, "metrics": metrics, "finished_at": finished, "duration_s": 12.5,
                "config": {"training": config or {"learning_rate": 1e-3, "max_steps": 6, "output_dir": str(path)}},
                "data": data or {"sources": [{"source": "demo:sft", "fingerprint": "aaaa1111", "rows_kept": 64}]}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    if history is not None:
        (path / "metrics.json").write_text(json.dumps({**metrics, "log_history": history}))
    return path


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    sft = make_stage(run / "sft", "sft", parent="tiny-base", metrics=SFT_METRICS, history=SFT_HISTORY,
                     finished="2026-01-01T00:00:01Z")
    ev = run / "dpo_vs_sft"
    ev.mkdir()
    report = {"policy": str(run / "dpo"), "reference": str(sft), "judge": {"name": "reward_model:rm", "spec": "rm"},
              "headline": "win rate 0.500 over 3 prompts", "stats": {"win_rate": 0.5},
              "per_prompt": PER_PROMPT}
    (ev / "report.json").write_text(json.dumps(report))
    (ev / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PER_PROMPT))
    (ev / "manifest.json").write_text(json.dumps({"status": "complete", "stage": "evaluate", "fingerprint": "fp-eval",
                                                  "policy": str(run / "dpo"), "reference": str(sft),
                                                  "metrics": {"win_rate": 0.5}, "prompts": {"source": "demo:prompts"},
                                                  "finished_at": "2026-01-01T00:00:02Z"}))
    return run


def test_report_is_self_contained_escaped_and_redacted(run_dir):
    path = R.write_report(run_dir)
    text = path.read_text()
    assert path == run_dir / "report.html"
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in text and "<script>document.title" not in text
    assert SECRET not in text and "kiwi ***" in text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from anywhere
    assert text.count('class="prompt-row') == len(PER_PROMPT)
    assert "data:image/png;base64," in text  # the SFT curves, inlined
    assert "lineage:</b> <span title='tiny-base'>base model (tiny-base)</span> &rarr; <span title='" in text
    # the SFT metrics against the base model: 2.1 -> 1.7
    assert re.search(r"<td>loss</td><td>2.1</td><td>1.7</td><td>-0.4</td>", text)


def test_report_of_a_folder_without_outputs_is_a_clear_error(tmp_path):
    from stages.report import main

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert not (tmp_path / "empty" / "report.html").exists()


def chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        pytest.fail("CI must have Chromium: .ci/run installs it")
    if found is None:
        pytest.skip("Chromium is not installed here (apt-get install chromium); CI installs it")
    return found


def browser(tmp_path, *args, url: str):
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--enable-logging=stderr", "--v=0", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_renders_in_a_real_browser_with_one_row_per_prompt_and_no_console_errors(run_dir, tmp_path):
    page = R.write_report(run_dir)
    done = browser(tmp_path, "--dump-dom", url=page.as_uri())
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'data-ready="yes"' in dom  # the page's script ran to its end
    assert len(re.findall(r'<tr class="prompt-row', dom)) == len(PER_PROMPT)
    assert dom.count("<script") == 1 and "<title>rlhf report: run</title>" in dom  # the model's <script> stayed text
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;hi" in dom
    assert not re.findall(r"CONSOLE.*|Uncaught.*", done.stderr)
    # the outcome filter, opened from the address: only the loss row stays visible
    filtered = browser(tmp_path, "--dump-dom", url=page.as_uri() + "#filter=loss").stdout
    rows = re.findall(r'<tr class="prompt-row (\w+)" data-outcome="\w+"( hidden="")?>', filtered)
    assert sorted(rows) == [("loss", ""), ("tie", ' hidden=""'), ("win", ' hidden=""')]


def test_report_screenshot_is_a_png(run_dir, tmp_path):
    page = R.write_report(run_dir)
    shot = tmp_path / "report.png"
    done = browser(tmp_path, f"--screenshot={shot}", "--window-size=1100,900", "--hide-scrollbars", url=page.as_uri())
    assert done.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG"


# -- runs and compare ------------------------------------------------------------------------------------------------
def two_sft_runs(root: Path):
    a = make_stage(root / "lr-high" / "sft", "sft", parent="tiny-base", metrics=SFT_METRICS, history=SFT_HISTORY,
                   config={"learning_rate": 1e-3, "max_steps": 6, "output_dir": "x"}, finished="2026-01-02T00:00:00Z")
    other = [dict(e, eval_loss=e["eval_loss"] - 0.3) if "eval_loss" in e else e for e in SFT_HISTORY]
    b = make_stage(root / "lr-low" / "sft", "sft", parent="tiny-base",
                   metrics={"base": {"base_loss": 2.1}, "final": {"eval_loss": 1.4}}, history=other,
                   config={"learning_rate": 1e-4, "max_steps": 6, "output_dir": "y"}, finished="2026-01-03T00:00:00Z",
                   data={"sources": [{"source": "demo:sft", "fingerprint": "bbbb2222", "rows_kept": 64}]})
    (root / "lr-low" / ".sft.work").mkdir()  # the suite's work dir is never listed
    return a, b


def test_runs_lists_finished_outputs_with_stage_base_data_and_metrics(tmp_path, capsys):
    two_sft_runs(tmp_path)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({"status": "running", "stage": "sft"}))
    assert RUNS.runs_main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    body = lines[2:]
    assert len(body) == 2 and "half" not in "\n".join(lines)
    assert body[0].split()[:5] == ["2026-01-02T00:00:00Z", "lr-high/sft", "sft", "tiny-base", "demo:sft"]
    assert "val loss 1.7" in body[0] and "base loss 2.1" in body[0] and "val loss 1.4" in body[1]
    assert RUNS.runs_main([str(tmp_path / "missing")]) == 2


def test_compare_shows_what_differs_metrics_and_one_validation_plot(tmp_path, capsys):
    a, b = two_sft_runs(tmp_path)
    plot = tmp_path / "cmp.png"
    assert RUNS.compare_main([str(a), str(b), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    differ = out.split("hyperparameters that differ:")[1].split("\n\n")[0]
    assert "learning_rate" in differ and "max_steps" not in differ and "output_dir" not in differ
    assert re.search(r"demo:sft\s+aaaa1111\s+bbbb2222", out)
    assert re.search(r"val loss\s+1.7\s+1.4", out)
    assert plot.read_bytes()[:4] == b"\x89PNG" and "validation curves (eval_loss)" in out
    assert RUNS.compare_main([str(a), str(tmp_path)]) == 2


def test_compare_never_overwrites_a_plot_it_was_not_told_to_write(tmp_path, monkeypatch, capsys):
    a, b = two_sft_runs(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "compare.png").write_bytes(b"a user's own figure")
    assert RUNS.compare_main([str(a), str(b)]) == 0
    assert (tmp_path / "compare.png").read_bytes() == b"a user's own figure"
    assert (tmp_path / "compare-2.png").read_bytes()[:4] == b"\x89PNG" and "compare-2.png" in capsys.readouterr().out
    assert RUNS.compare_main([str(a), str(b)]) == 0
    assert (tmp_path / "compare-3.png").exists()


def test_compare_plot_draws_one_validation_curve_per_run():
    other = [dict(e, eval_loss=e["eval_loss"] - 0.3) if "eval_loss" in e else e for e in SFT_HISTORY]
    fig = plots.validation_figure([("lr-high", SFT_HISTORY), ("lr-low", other)])
    (ax,) = fig.axes
    curves = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert curves == {"lr-high": [1.9, 1.6, 1.7], "lr-low": pytest.approx([1.6, 1.3, 1.4])}
    assert RUNS.validation_key([SFT_HISTORY, [{"eval_accuracy": 0.5, "step": 1}]]) is None
    assert RUNS.validation_key([SFT_HISTORY, other]) == "eval_loss"
