"""Talk to a stage output (or an exported model) in the terminal, or get one reply for a script.

    rlhf chat runs/x/dpo                          # interactive: streaming replies, history kept
    rlhf chat runs/x/dpo --prompt "Hi" --temperature 0   # one-shot: only the reply on stdout

Interactive commands: /reset clears the history, /history shows it, /exit (or Ctrl-D) quits; Ctrl-C
stops a reply being generated. The chat template saved with the output is applied to the whole history;
the oldest turns are dropped when the conversation outgrows the model's context. LoRA/DoRA/IA3 outputs
are merged into their base on load (stages.core.policy.load_model); prefix/prompt/bottleneck adapters run
on their base. The tokenizer comes from the output directory.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python stages/chat.py` runs this file as a script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from stages.core import stage as S  # noqa: E402
from stages.core.errors import ModelError  # noqa: E402

PROMPT, REPLY = "you> ", "assistant> "
HELP = "commands: /reset clears the history, /history shows it, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def resolve_path(path: str) -> Path:
    """The directory to load: a stage output, a model dir, or an export (its adapter/ when it is base + adapter)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        from stages.core.models import ALIASES

        if path in ALIASES:
            from stages.core.models import resolve_model

            return Path(resolve_model(path))
        raise ModelError(f"{path}: not a directory; expected a stage output (e.g. runs/x/sft) or an exported model")
    if not (p / "config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        raise ModelError(f"{path}: holds no model (config.json) or adapter (adapter_config.json)")
    return p


def load_chat_model(path: str, device: str | None = None):
    """(model, tokenizer, kind) ready for generation."""
    import torch

    from stages.core.models import load_tokenizer, sync_model_special_tokens
    from stages.export import load_for_inference, task_of

    p = resolve_path(path)
    if task_of(p) != "causal_lm":
        raise ModelError(f"{path}: a reward model (sequence classifier) cannot chat; score with `rlhf score`")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = load_tokenizer(str(p))
    model, kind = load_for_inference(p, task="causal_lm", dtype=dtype)
    sync_model_special_tokens(model, tokenizer)
    model.config.use_cache = True
    return model.to(device).eval(), tokenizer, kind


def context_limit(model, tokenizer) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    m = getattr(tokenizer, "model_max_length", None)
    return m if isinstance(m, int) and 0 < m < 10**7 else 2048


class ChatSession:
    """A conversation with a model: the history, the chat template, generation."""

    def __init__(self, model, tokenizer, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.95):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.limit = context_limit(model, tokenizer)
        self.history: list[dict] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        self.history, self.dropped_turns = [], 0

    def messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def encode(self, turns: list[dict]):
        text = self.tokenizer.apply_chat_template(self.messages(turns), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)

    def fit(self, turns: list[dict]):
        """Encode the conversation, dropping the oldest exchanges while it does not fit the context."""
        budget = max(self.limit - self.max_new_tokens, 1)
        enc = self.encode(turns)
        while enc["input_ids"].shape[1] > budget and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[1:]
            self.dropped_turns += 1
            enc = self.encode(turns)
        if enc["input_ids"].shape[1] > budget:  # one message longer than the context: keep its end
            enc = {k: v[:, -budget:] for k, v in enc.items()}
        return turns, enc

    def send(self, text: str, streamer=None) -> str:
        """Add a user turn, generate the reply (streamed to `streamer` if given), keep both in the history."""
        import torch

        turns, enc = self.fit(self.history + [{"role": "user", "content": text}])
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        tok = self.tokenizer
        kw = dict(max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(**enc, **kw, streamer=streamer)
        reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.history = turns + [{"role": "assistant", "content": reply}]
        return reply


def interactive(session: ChatSession, path: str, kind: str) -> None:
    from transformers import TextStreamer

    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history at the prompt)
        except ImportError:
            pass
    print(f"chatting with {path} ({kind}); {HELP}", flush=True)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:  # Ctrl-D
            print()
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)")
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            session.reset()
            print("(history cleared)", flush=True)
            continue
        if cmd == "/history":
            print("\n".join(f"{m['role']}: {m['content']}" for m in session.history) or "(empty)", flush=True)
            continue
        if cmd.startswith("/"):
            print(f"unknown command {cmd}; {HELP}", flush=True)
            continue
        print(REPLY, end="", flush=True)
        dropped = session.dropped_turns
        try:
            session.send(line, streamer=TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True))
        except KeyboardInterrupt:
            print("\n(reply stopped; not kept in the history)", flush=True)
            continue
        if session.dropped_turns > dropped:
            print("(the oldest turns were dropped to fit the context)", flush=True)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf chat", description="Chat with a stage output or an exported model.")
    p.add_argument("run", metavar="RUN/STAGE", help="a stage output (e.g. runs/x/sft), an export, or a model dir")
    p.add_argument("--prompt", help="one-shot: print only the reply to this message and exit")
    p.add_argument("--system", help="a system message placed before the conversation")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy decoding")
    p.add_argument("--top_p", "--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the terminal (and a script's stdout) for the conversation
    hf_logging.disable_progress_bar()
    model, tokenizer, kind = load_chat_model(args.run, args.device)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    session = ChatSession(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p)
    if args.prompt is not None:
        print(session.send(args.prompt), flush=True)
        return
    interactive(session, args.run, kind)


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
