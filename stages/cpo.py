"""CPO stage (trl.experimental CPOTrainer): reference-free, offline, like ORPO; SimPO is its `loss_type: simpo`.

    accelerate launch stages/cpo.py --config recipes/smollm2-135m/cpo.yaml
    python -m stages.cpo --config ...      rlhf cpo --config ...

The flow (reference model, truncation, metrics, artifact) is shared: see stages/core/preference.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch stages/cpo.py` runs this file as a script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from stages.core import stage as S  # noqa: E402


def main(argv=None):
    from stages.core.preference import run

    return run("cpo", argv)


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
