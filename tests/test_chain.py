"""Chains: validation, references, skip/invalidate/resume, lineage."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages import chain as C
from stages.core.errors import ConfigError
from stages.lineage import format_lineage

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


def write_chain(tmp_path, model, *, dpo_beta=0.1, sft_steps=6):
    spec = {
        "run_dir": str(tmp_path / "run"),
        "stages": {
            "sft": {"stage": "sft", "recipe": str(TINY / "sft.yaml"),
                    "with": {"model_name_or_path": str(model), "max_steps": sft_steps}},
            "rm": {"stage": "rm", "recipe": str(TINY / "rm.yaml"),
                   "with": {"model_name_or_path": {"from": "sft"}, "datasets": ["demo:preference"],
                            "eval_datasets": ["demo:preference_eval"], "max_train_rows": 24, "max_eval_rows": 8,
                            "num_train_epochs": 1}},
            "dpo": {"stage": "dpo", "recipe": str(TINY / "dpo.yaml"),
                    "with": {"model_name_or_path": {"from": "sft"}, "datasets": ["demo:preference"],
                             "eval_datasets": ["demo:preference_eval"], "max_train_rows": 24, "max_eval_rows": 8,
                             "max_steps": 3, "beta": dpo_beta}},
        },
    }
    p = tmp_path / "chain.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def test_chain_validation_names_the_problem(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"stages": {"dpo": {"stage": "dpo", "recipe": str(TINY / "dpo.yaml"),
                                                    "with": {"model_name_or_path": {"from": "sft"}}}}}))
    with pytest.raises(ConfigError, match=r"stages.dpo.with.model_name_or_path: 'from: sft' must name an earlier stage"):
        C.load_chain(p)
    p.write_text(yaml.safe_dump({"stages": {"x": {"stage": "sfx", "recipe": "a.yaml"}}}))
    with pytest.raises(ConfigError, match="stages.x.stage: unknown stage 'sfx'"):
        C.load_chain(p)
    p.write_text(yaml.safe_dump({"stages": {"x": {"stage": "sft", "recipe": "missing.yaml"}}}))
    with pytest.raises(ConfigError, match="stages.x.recipe: not found"):
        C.load_chain(p)
    p.write_text(yaml.safe_dump({"stagez": {}}))
    with pytest.raises(ConfigError, match="unknown key 'stagez'"):
        C.load_chain(p)


def test_inputs_must_be_complete_before_a_stage_starts(tmp_path, tiny_llama):
    chain = C.load_chain(write_chain(tmp_path, tiny_llama))
    run_dir = tmp_path / "run"
    (run_dir / "sft").mkdir(parents=True)
    (run_dir / "sft" / "manifest.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(ConfigError, match="stage 'rm': input model_name_or_path = .* is not a complete stage output"):
        C.check_inputs("rm", chain["stages"]["rm"], run_dir)


def test_commands_resolve_references_and_use_accelerate(tmp_path, tiny_llama):
    chain = C.load_chain(write_chain(tmp_path, tiny_llama))
    cmd = C.command_for("rm", chain["stages"]["rm"], chain, tmp_path / "run")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--model_name_or_path") + 1] == str(tmp_path / "run" / "sft")
    assert cmd[cmd.index("--output_dir") + 1] == str(tmp_path / "run" / "rm")
    assert cmd[cmd.index("--datasets") + 1] == "demo:preference"


@pytest.mark.slow
def test_chain_runs_skips_invalidates_and_prints_lineage(tmp_path, tiny_llama, capsys):
    path = write_chain(tmp_path, tiny_llama)
    assert C.run_chain(path) == {"sft": "ran", "rm": "ran", "dpo": "ran"}
    progress = capsys.readouterr().out
    assert "[chain 1/3] sft: started at" in progress and "[chain 3/3] dpo: finished in" in progress
    run = tmp_path / "run"
    for name in ("sft", "rm", "dpo"):
        assert json.loads((run / name / "manifest.json").read_text())["status"] == "complete"
    assert C.run_chain(path) == {"sft": "skipped", "rm": "skipped", "dpo": "skipped"}
    # a changed DPO setting re-runs DPO only
    path = write_chain(tmp_path, tiny_llama, dpo_beta=0.2)
    assert C.run_chain(path) == {"sft": "skipped", "rm": "skipped", "dpo": "ran"}
    # a changed SFT setting invalidates everything after it
    path = write_chain(tmp_path, tiny_llama, dpo_beta=0.2, sft_steps=4)
    assert C.run_chain(path) == {"sft": "ran", "rm": "ran", "dpo": "ran"}
    text = format_lineage(str(run / "dpo"))
    assert "[dpo, lora" in text and "[sft, lora" in text and str(tiny_llama) in text and "[base model]" in text
    capsys.readouterr()
    assert C.cli([str(path)]) == 0  # all skipped now; still the closing table and the report
    out = capsys.readouterr().out
    assert f"[chain] report: {run / 'report.html'}" in out
    html = (run / "report.html").read_text()
    assert all(f"id='stage-{name}'" in html for name in ("sft", "rm", "dpo"))


@pytest.mark.slow
def test_killed_stage_resumes_from_its_checkpoint(tmp_path, tiny_llama):
    path = write_chain(tmp_path, tiny_llama, sft_steps=40)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "run", str(path)], cwd=tmp_path, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "run" / ".sft.work" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpt_dir.glob("checkpoint-*/trainer_state.json")):
        time.sleep(1)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpt_dir.glob("checkpoint-*")), "no checkpoint before the kill"
    assert not (tmp_path / "run" / "sft" / "manifest.json").exists()  # nothing complete-looking
    first = min(int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*"))
    out = subprocess.run([sys.executable, "-m", "stages.cli", "run", str(path), "--only", "sft"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from" in out.stdout + out.stderr
    assert json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())["status"] == "complete"
    assert first >= 1
