"""The `rlhf` console script. Imports stay lazy so `rlhf --help` is instant."""
from __future__ import annotations

import importlib
import sys

from . import registry

# name -> (module, function, one-line help); every stage comes from the registry (stages/registry.py)
TOOLS = {
    "run": ("stages.chain", "cli", "run a chain of stages (no argument: the built-in demo chain)"),
    "lineage": ("stages.lineage", "main", "print a stage output's lineage back to the base model"),
    "winrate": ("reward.winrate_cli", "main", "preference win rate of a policy vs a reference, with a report"),
    "plan": ("stages.plan", "main", "per-GPU memory for DDP / ZeRO-2 / ZeRO-3 / offload and the launch config to pick"),
    "score": ("reward.score_cli", "main", "score a JSONL of prompt/response rows with a reward model or rule"),
    "export": ("stages.export", "cli", "merge a stage output into a standalone safetensors model (transformers/vLLM/TGI)"),
    "predict": ("stages.predict", "cli", "label rows with a classify output: labels, scores, top-k (JSONL)"),
    "chat": ("stages.chat", "cli", "chat with a stage output or export in the terminal (--prompt for one reply)"),
    "demo-data": ("stages.core.demo", "cli", "write the built-in demo datasets as JSONL files"),
    "report": ("stages.report", "main", "write one self-contained report.html for a stage output or a chain run dir"),
    "runs": ("stages.runs", "runs_main", "list finished stage outputs under a folder (stage, base, data, key metrics, when)"),
    "compare": ("stages.runs", "compare_main", "stage outputs side by side: differing settings and data, metrics, curves"),
}
COMMANDS = {**{n: (s.module, "cli", s.help) for n, s in registry.STAGES.items()}, **TOOLS}

USAGE = """usage: rlhf COMMAND [ARGS...]

Commands:
{commands}

Each stage command accepts `--config RECIPE.yaml` plus any recipe key as a flag, e.g.
  rlhf sft --config recipes/smollm2-135m/sft.yaml --learning_rate 1e-4
"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {k.ljust(width)}  {v[2]}" for k, v in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(cmd, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{cmd}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module, fn, _ = COMMANDS[cmd]
    from .core import noise  # before any third-party import: some harmless warnings are printed at import

    noise.install(noise.verbose_requested(rest))
    return int(getattr(importlib.import_module(module), fn)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
