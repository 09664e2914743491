"""Online DPO stage: TRL's experimental OnlineDPOTrainer fed by the suite's reward plumbing (reward model and/or weighted rule rewards).

    accelerate launch stages/online_dpo.py --config recipes/smollm2-135m/online_dpo.yaml
    python -m stages.online_dpo --config RECIPE.yaml
    rlhf online_dpo --config RECIPE.yaml

Two sampled completions per prompt are ranked by the weighted rewards and a DPO step is taken on the pair.
Prompts come from any prompt-bearing data (prompt-only, preference pairs, conversations); the manifest
records the greedy held-out mean reward before and after training. See stages/core/ppo/online.py and
stages/core/ppo/online_dpo.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch stages/X.py` runs this file as a script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from stages.core import stage as S  # noqa: E402

STAGE = "online_dpo"


def main(argv=None):
    from stages.core.ppo.online import run

    return run(STAGE, argv)


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
