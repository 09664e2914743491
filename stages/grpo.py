"""GRPO stage: TRL's GRPOTrainer with the suite's reward plumbing (reward model and/or weighted rule rewards).

    accelerate launch stages/grpo.py --config recipes/smollm2-135m/grpo.yaml
    python -m stages.grpo --config RECIPE.yaml
    rlhf grpo --config RECIPE.yaml

Prompts come from any prompt-bearing data (prompt-only, preference pairs, conversations); the manifest
records the greedy held-out mean reward before and after training. See stages/core/ppo/online.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch stages/X.py` runs this file as a script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from stages.core import stage as S  # noqa: E402

STAGE = "grpo"


def main(argv=None):
    from stages.core.ppo.online import run

    return run(STAGE, argv)


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
