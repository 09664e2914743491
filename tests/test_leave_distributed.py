"""A launched rank ends its process through runtime.leave_distributed: exit handlers run, output is flushed,
the stage's exit code is kept, and the C-level finalization (where a ZeRO-3 rank aborted in a C++ destructor,
exit -6) is skipped. A Python object that aborts the process when finalization destroys it stands in for that
destructor; the control run without a process group shows it does abort an ordinary exit."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RANK = """
import atexit, os, pathlib, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from stages.core.errors import ConfigError
from stages.core.stage import run_cli

class AbortsWhenFinalised:  # stands in for the C++ object whose destructor aborted the rank
    def __del__(self, abort=os.abort):  # bound now: finalization has cleared the module's names by then
        abort()

keeper = AbortsWhenFinalised()
atexit.register(lambda: pathlib.Path({marker!r}).write_text("ran"))
if {group!r}:
    dist.init_process_group("gloo", rank=0, world_size=1)

def main(argv):
    print("the stage's last line", end="")  # unflushed: stdout is a pipe, so block-buffered
    if {fail!r} == "config":
        raise ConfigError("bad key")
    if {fail!r} == "exit":
        raise SystemExit(3)

sys.exit(run_cli(main, []))
"""


def run_rank(tmp_path, *, group: bool, fail: str = "") -> subprocess.CompletedProcess:
    marker = tmp_path / "atexit.txt"
    script = tmp_path / "rank.py"
    script.write_text(RANK.format(root=str(ROOT), marker=str(marker), group=group, fail=fail))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)


def test_the_stand_in_aborts_an_ordinary_exit(tmp_path):
    r = run_rank(tmp_path, group=False)
    assert r.returncode == -6, r.stderr[-2000:]


def test_a_launched_rank_skips_finalization_after_its_exit_handlers(tmp_path):
    r = run_rank(tmp_path, group=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "atexit.txt").read_text() == "ran"  # atexit handlers and weakref finalizers still run
    assert r.stdout.endswith("the stage's last line")  # flushed before the process ends


@pytest.mark.parametrize(("fail", "code"), [("config", 2), ("exit", 3)])
def test_a_failed_launched_rank_keeps_the_stage_exit_code(tmp_path, fail, code):
    r = run_rank(tmp_path, group=True, fail=fail)
    assert r.returncode == code, r.stderr[-2000:]  # not -6: a sys.exit inside the stage leaves the same way
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert fail != "config" or "error: bad key" in r.stderr


@pytest.mark.parametrize("env_var", ["LOCAL_RANK", "WORLD_SIZE"])
def test_a_process_group_outside_a_launch_returns_to_its_caller(tmp_path, monkeypatch, env_var):
    """In-process callers (tests, notebooks) that opened a group themselves get the exit code back."""
    import torch.distributed as dist

    from stages.core import runtime

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv(env_var)

    def no_exit(code):
        raise AssertionError(f"os._exit({code}) in a process no launcher started")

    monkeypatch.setattr(os, "_exit", no_exit)
    assert runtime.leave_distributed(0) == 0
    assert not dist.is_initialized()  # torn down all the same
