"""What the suite promises about your files, tested one guarantee at a time (stages/core/lifecycle.py)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages import chain as C
from stages import sft
from stages.core import lifecycle, policy
from stages.core.errors import ConfigError
from stages.core.lifecycle import StageRun

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/sft.yaml")
FAKE_TOKEN = "hf_" + "Z" * 34


def run_sft(model, out, *extra):
    return sft.main(["--config", TINY, "--model_name_or_path", str(model), "--output_dir", str(out), *extra])


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if any stage loads weights."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(policy, "build_policy", refuse)
    monkeypatch.setattr(policy, "load_model", refuse)


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


# -- output safety ----------------------------------------------------------------------------------------
def test_a_user_folder_at_output_dir_survives_and_the_stage_refuses(tiny_llama, tmp_path, no_model_load):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(b"\x00")
    for flags in ([], ["--force", "true"]):
        with pytest.raises(ConfigError, match="did not write"):
            run_sft(tiny_llama, out, *flags)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub" / "data.bin").is_file()


def test_a_regular_file_a_symlink_the_cwd_and_home_are_refused(tiny_llama, tmp_path, no_model_load, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run_sft(tiny_llama, f, "--force", "true")
    assert f.read_text() == "x"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="symbolic link"):
        run_sft(tiny_llama, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="current directory"):
        run_sft(tiny_llama, ".")
    with pytest.raises(ConfigError, match="home directory"):
        run_sft(tiny_llama, "~")


def test_an_output_dir_above_or_inside_an_input_is_refused(tiny_llama, tmp_path, no_model_load):
    with pytest.raises(ConfigError, match="contains the input"):
        run_sft(tiny_llama, tiny_llama.parent)
    with pytest.raises(ConfigError, match="inside the input directory"):
        run_sft(tiny_llama, tiny_llama / "out")


def test_force_never_replaces_another_stage_s_output(tiny_llama, tmp_path, no_model_load):
    out = tmp_path / "rm"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"stage": "rm", "status": "complete", "fingerprint": "x"}))
    with pytest.raises(ConfigError, match="holds a 'rm' stage output"):
        run_sft(tiny_llama, out, "--force", "true")
    assert json.loads((out / "manifest.json").read_text())["stage"] == "rm"


def test_force_keeps_what_the_stage_did_not_write_and_no_output_nests_in_another(tiny_llama, tmp_path):
    out = tmp_path / "sft"
    run_sft(tiny_llama, out)
    assert {"manifest.json", "adapter_model.safetensors"} <= set(json.loads((out / "manifest.json").read_text())["files"])
    (out / "my-notes.txt").write_text("keep me")
    run_sft(tiny_llama, out)  # the same config: nothing to do, nothing touched
    with pytest.raises(ConfigError, match=r"did not write \(my-notes.txt\).*would delete them"):
        run_sft(tiny_llama, out, "--learning_rate", "1e-3", "--force", "true")
    assert (out / "my-notes.txt").read_text() == "keep me"
    (out / "my-notes.txt").unlink()
    (out / "report.html").write_text("<html>")  # `rlhf report` writes here: the suite's own, replaced with the rest
    run_sft(tiny_llama, out, "--learning_rate", "1e-3", "--force", "true")
    assert json.loads((out / "manifest.json").read_text())["inputs"]["config"]["learning_rate"] == 1e-3
    with pytest.raises(ConfigError, match="inside the sft stage output"):  # --force on `out` would delete it
        run_sft(tiny_llama, out / "nested")
    assert not (out / "nested").exists()


def test_a_folder_named_like_the_work_folder_that_the_suite_did_not_make_survives(tiny_llama, tmp_path, no_model_load):
    work = tmp_path / ".out.work"
    work.mkdir()
    (work / "backup.txt").write_text("keep me")
    for flags in ([], ["--force", "true"]):
        with pytest.raises(ConfigError, match=r"did not write \(backup.txt\)"):
            run_sft(tiny_llama, tmp_path / "out", *flags)
    assert (work / "backup.txt").read_text() == "keep me" and not (tmp_path / "out").exists()


def test_chain_stage_names_stay_inside_run_dir(tmp_path):
    p = tmp_path / "c.yaml"
    for bad in ("../x", "a/b", ".hidden"):
        p.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": {bad: {"stage": "sft", "recipe": TINY}}}))
        with pytest.raises(ConfigError, match="stage name"):
            C.load_chain(p)


# -- parse-time errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,key", [(["--learning_rate", "0"], "learning_rate"), (["--max_length", "0"], "max_length"),
                                       (["--lora_r", "0"], "lora_r"), (["--max_steps", "many"], "max_steps"),
                                       (["--validation_fraction", "0", "--eval_datasets", "[]"], "eval_strategy: steps"),
                                       (["--resume_from_checkpoint", "/elsewhere/checkpoint-9"], "resumes by itself")])
def test_values_that_would_fail_later_are_refused_at_parse_time(tiny_llama, tmp_path, no_model_load, capsys, flags, key):
    assert sft.cli(["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "o"),
                    *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()


def test_an_eval_file_with_no_rows_is_named(tiny_llama, tmp_path, no_model_load, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = sft.cli(["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "o"),
                    "--eval_datasets", str(empty)])
    err = capsys.readouterr().err
    assert code == 2 and "empty.jsonl" in err


# -- fingerprints and resume -----------------------------------------------------------------------------
class _Crash(Exception):
    pass


def crash_after(monkeypatch, step):
    from transformers import TrainerCallback

    class CrashAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise _Crash()

    orig = StageRun.callbacks
    monkeypatch.setattr(StageRun, "callbacks", lambda self: orig(self) + [CrashAfter()])


def interrupted_run(model, tmp_path, monkeypatch):
    """An SFT run killed after step 4: checkpoint-3 stays in the work dir, no output."""
    out = tmp_path / "sft"
    crash_after(monkeypatch, 4)
    with pytest.raises(_Crash):
        run_sft(model, out)
    monkeypatch.undo()
    return out


def test_a_changed_learning_rate_refuses_resume_and_force_starts_afresh(tiny_llama, tmp_path, monkeypatch):
    out = interrupted_run(tiny_llama, tmp_path, monkeypatch)
    ckpt = tmp_path / ".sft.work" / "checkpoints" / "checkpoint-3"
    assert json.loads((ckpt / lifecycle.CHECKPOINT_FINGERPRINT).read_text())["fingerprint"]
    with pytest.raises(ConfigError, match=r"cannot be resumed.*learning_rate.*--force true"):
        run_sft(tiny_llama, out, "--learning_rate", "1e-3")
    assert ckpt.is_dir()  # nothing deleted without --force
    run_sft(tiny_llama, out, "--learning_rate", "1e-3", "--force", "true")
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["inputs"]["config"]["learning_rate"] == 1e-3
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert min(h["step"] for h in history if "loss" in h) < 3  # trained from step 0, not resumed at 3


def test_damaged_and_pre_fingerprint_checkpoints(tiny_llama, tmp_path, monkeypatch):
    out = interrupted_run(tiny_llama, tmp_path, monkeypatch)
    work = tmp_path / ".sft.work"
    ckpt = work / "checkpoints" / "checkpoint-3"
    (ckpt / "trainer_state.json").write_text("{not json")  # damaged: skipped like an incomplete one
    run = StageRun("sft", ["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(out)])
    with run:
        assert run.resume_from is None
    # a checkpoint from before this change: no work.json, no recorded fingerprint
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / lifecycle.CHECKPOINT_FINGERPRINT).unlink()
    (work / lifecycle.WORK_STATE).unlink()
    with pytest.raises(ConfigError, match="before the suite recorded fingerprints"):
        with StageRun("sft", ["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(out)]):
            pass


def test_fingerprint_is_content_and_ignores_machine_choices(tiny_llama, tmp_path):
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "o"),
            "--datasets", str(data), "--eval_datasets", "[]"]
    fp, _ = lifecycle.fingerprint_of("sft", argv)
    assert lifecycle.fingerprint_of("sft", argv + ["--num_threads", "1"])[0] == fp
    rows[0]["completion"] = "edited"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fp2, comps = lifecycle.fingerprint_of("sft", argv)
    assert fp2 != fp and "dir:" in comps["model_name_or_path"]
    (tiny_llama / "config.json").touch()  # same bytes, new mtime: same content key
    assert lifecycle.fingerprint_of("sft", argv)[0] == fp2


# -- chains ----------------------------------------------------------------------------------------------
def test_an_edited_dataset_reruns_its_stage_and_dependants_and_untouched_ones_skip_without_loading(
        tiny_llama, tmp_path, monkeypatch):
    data = tmp_path / "sft.jsonl"
    from stages.core.demo import sft_examples

    rows = sft_examples(48)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"run_dir": str(tmp_path / "run"), "stages": {
        "sft": {"stage": "sft", "recipe": TINY, "with": {"model_name_or_path": str(tiny_llama), "max_steps": 2,
                                                          "datasets": [str(data)], "eval_datasets": "[]"}},
        "sft2": {"stage": "sft", "recipe": TINY, "with": {"model_name_or_path": {"from": "sft"}, "max_steps": 2}}}}
    chain = tmp_path / "chain.yaml"
    chain.write_text(yaml.safe_dump(spec))
    assert C.run_chain(chain) == {"sft": "ran", "sft2": "ran"}

    def no_subprocess(*a, **k):
        raise AssertionError("a stage process was started")

    monkeypatch.setattr(C.subprocess, "run", no_subprocess)
    monkeypatch.setattr(policy, "build_policy", no_subprocess)
    monkeypatch.setattr(policy, "load_model", no_subprocess)
    assert C.run_chain(chain) == {"sft": "skipped", "sft2": "skipped"}
    rows[0]["messages"][-1]["content"] += " (edited)"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert C.run_chain(chain, dry_run=True) == {"sft": "planned", "sft2": "planned"}


def test_two_runs_on_one_output_dir_the_second_refuses_and_the_first_finishes(tiny_llama, tmp_path):
    out = tmp_path / "sft"
    first = subprocess.Popen([sys.executable, "-m", "stages.sft", "--config", TINY, "--model_name_or_path",
                              str(tiny_llama), "--output_dir", str(out), "--max_steps", "6"], env=env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".sft.lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert lock.exists(), first.stderr.read() if first.poll() is not None else "lock never appeared"
    with pytest.raises(ConfigError, match=f"in use by process {first.pid} on this host"):
        run_sft(tiny_llama, out)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert not lock.exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tiny_llama, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".sft.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    run_sft(tiny_llama, tmp_path / "sft", "--max_steps", "2")
    assert f"left by process {dead.pid}" in capsys.readouterr().out
    from stages.core.safety import Lock

    (tmp_path / ".x.lock").write_text(json.dumps({"pid": dead.pid, "host": "another-host", "started": 0}))
    with pytest.raises(ConfigError, match="on host another-host"):  # another host's lock is reported, not stolen
        Lock(tmp_path / ".x.lock", "x").acquire()


# -- caches, secrets, env ----------------------------------------------------------------------------------
def test_the_merged_base_cache_is_keyed_by_task(tiny_llama, tmp_path, monkeypatch):
    """An RM stage's QLoRA merge (sequence classification) is never served to a DPO stage as a causal LM."""
    from transformers import BitsAndBytesConfig

    monkeypatch.setenv("RLHF_SUITE_CACHE", str(tmp_path / "cache"))
    adapter = tmp_path / "sft"
    run_sft(tiny_llama, adapter, "--max_steps", "1")
    q = BitsAndBytesConfig(load_in_8bit=True)
    seq, _, _ = policy.load_model(str(adapter), task="seq_cls", num_labels=1, quantization=q)
    lm, _, _ = policy.load_model(str(adapter), task="causal_lm", quantization=q)
    assert type(seq).__name__.endswith("ForSequenceClassification")
    assert type(lm).__name__.endswith("ForCausalLM")
    archs = sorted(json.loads((d / "config.json").read_text())["architectures"][0]
                   for d in (tmp_path / "cache" / "merged").iterdir() if not d.name.startswith("."))
    assert len(archs) == 2 and archs[0] != archs[1]


def test_a_planted_secret_reaches_no_written_file(tiny_llama, tmp_path):
    recipe = yaml.safe_load(Path(TINY).read_text())
    recipe["env"] = {"MY_SERVICE_API_KEY": "sk-" + "Q" * 30}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    spec = {"run_dir": str(tmp_path / "run"), "stages": {"sft": {"stage": "sft", "recipe": str(tmp_path / "sft.yaml"),
            "with": {"model_name_or_path": str(tiny_llama), "max_steps": 2, "hub_token": FAKE_TOKEN}}}}
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "run", str(tmp_path / "chain.yaml")], env=env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "sft" / "manifest.json").is_file()
    for secret in (FAKE_TOKEN, "Q" * 30):
        assert secret not in proc.stdout + proc.stderr
        for f in (tmp_path / "run").rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f
    from stages.evaluate import _judge_fingerprint

    assert "pa55word" not in json.dumps(_judge_fingerprint("llm:http://user:pa55word@127.0.0.1:1/v1"))


def test_the_recipe_env_is_exported_before_transformers_is_imported(tiny_llama, tmp_path):
    recipe = yaml.safe_load(Path(TINY).read_text())
    recipe["env"] = {"TRANSFORMERS_VERBOSITY": "info"}  # read once, when transformers is imported
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "stages.sft", "--config", str(tmp_path / "r.yaml"), "--model_name_or_path",
                           str(tiny_llama), "--output_dir", str(tmp_path / "o"), "--max_steps", "1"],
                          env={k: v for k, v in env().items() if k != "TRANSFORMERS_VERBOSITY"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loading configuration file" in proc.stderr


def test_secret_keys_are_masked_but_metric_names_survive():
    from stages.core.secrets import redact_text, scrub, scrub_argv

    kept = {"kl_per_token": 0.1, "pad_token": "<p>", "mean_token_accuracy": 0.5, "num_tokens": 3}
    assert scrub({"hub_token": "x", "HF_TOKEN": "x", "my_api_key": "x", "db_password": "x", **kept}) == kept
    assert scrub_argv(["--hub_token", FAKE_TOKEN, "--api-key=abc", "--lr", "1"]) == ["--hub_token", "***", "--api-key=***", "--lr", "1"]
    assert redact_text("llm:https://bob:pw@host:8000/v1 and " + FAKE_TOKEN) == "llm:https://***@host:8000/v1 and ***"
