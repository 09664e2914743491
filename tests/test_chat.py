"""`rlhf chat`: one-shot replies for scripts, an interactive session through a real pseudo-terminal."""
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import chat
from test_export import lora, make_adapter_output

ROOT = Path(__file__).resolve().parents[1]
GREEDY = ["--max_new_tokens", "6", "--temperature", "0"]


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    return make_adapter_output(tiny_llama, tmp_path_factory.mktemp("chat") / "sft", lora())


def env():
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return e | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def test_one_shot_prints_only_the_reply(run_dir):
    r = subprocess.run([sys.executable, "-m", "stages.chat", str(run_dir), "--prompt", "hi", *GREEDY],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    model, tok, kind = chat.load_chat_model(str(run_dir))
    expected = chat.ChatSession(model, tok, max_new_tokens=6, temperature=0).send("hi")
    assert kind == "merged" and expected
    assert r.stdout == expected + "\n"  # nothing but the reply on stdout


def test_bad_path_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stages.chat", str(tmp_path / "nope"), "--prompt", "hi"],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=600)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_session_keeps_history_resets_and_drops_old_turns_to_fit(run_dir):
    model, tok, _ = chat.load_chat_model(str(run_dir))
    s = chat.ChatSession(model, tok, max_new_tokens=4, temperature=0, system="Be brief.")
    first = s.send("hello")
    s.send("and again")
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]
    assert s.history[0]["content"] == "hello" and s.history[1]["content"] == first
    prompt = tok.decode(s.encode(s.history)["input_ids"][0])
    assert "Be brief." in prompt and "hello" in prompt and "and again" in prompt
    s.reset()
    assert s.history == []
    s.limit = 80  # a tiny context: the oldest exchange must go, the newest message stays
    for text in ("one two three four", "five six seven eight", "nine ten eleven twelve"):
        s.send(text)
    assert s.dropped_turns > 0 and s.history[-2]["content"] == "nine ten eleven twelve"
    assert s.encode(s.history[:-1])["input_ids"].shape[1] <= s.limit - s.max_new_tokens


def test_export_directories_chat_too(tiny_llama, tmp_path):
    from peft import PrefixTuningConfig

    from stages import export

    prefix = make_adapter_output(tiny_llama, tmp_path / "p", PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    out = export.main([str(prefix), "--out", str(tmp_path / "exported")])
    assert chat.resolve_path(str(out)) == out / "adapter"
    model, tok, kind = chat.load_chat_model(str(out))
    assert kind == "base+adapter"
    assert isinstance(chat.ChatSession(model, tok, max_new_tokens=3, temperature=0).send("hi"), str)


class Pty:
    """Drive a child process through a pseudo-terminal (stdin/stdout/stderr are the pty's slave end)."""

    def __init__(self, argv):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env(),
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.text = ""

    def expect(self, needle, limit=300.0):
        """Read until `needle` appears after what was already consumed (the limit only guards against a hang)."""
        end = time.monotonic() + limit
        while needle not in self.text:
            if time.monotonic() > end:
                raise AssertionError(f"never saw {needle!r}; output so far:\n{self.text[-3000:]}")
            ready, _, _ = select.select([self.master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"child exited before {needle!r}:\n{self.text[-3000:]}")
                self.text += data.decode("utf-8", "replace")
        seen, self.text = self.text.split(needle, 1)
        return seen

    def send(self, line):
        os.write(self.master, line.encode() + b"\n")

    def close(self):
        try:
            rc = self.proc.wait(timeout=120)
        finally:
            os.close(self.master)
        return rc


def test_interactive_session_through_a_terminal(run_dir):
    t = Pty([sys.executable, "-m", "stages.chat", str(run_dir), *GREEDY])
    try:
        banner = t.expect(chat.PROMPT)
        assert "/reset" in banner and "/exit" in banner
        t.send("hello there")
        t.expect(chat.REPLY)
        t.expect(chat.PROMPT)  # the streamed reply ends with the next prompt
        t.send("/history")
        history = t.expect(chat.PROMPT)
        assert "user: hello there" in history and "assistant:" in history
        t.send("/reset")
        assert "(history cleared)" in t.expect(chat.PROMPT)
        t.send("/history")
        assert "(empty)" in t.expect(chat.PROMPT)
        t.send("/exit")
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()


def test_ctrl_d_ends_the_session(run_dir):
    t = Pty([sys.executable, "-m", "stages.chat", str(run_dir), *GREEDY])
    try:
        t.expect(chat.PROMPT)
        os.write(t.master, b"\x04")  # Ctrl-D at an empty line: end of input
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
