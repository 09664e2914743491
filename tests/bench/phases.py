"""Resident memory by phase for one bench worker: after the imports, around model loading and the CPU fast
paths, at the start of training and after every optimizer step (a 20 ms sampler keeps the peak between marks).

    python tests/bench/phases.py sft-real [--steps 10] [-- EXTRA STAGE ARGS]   # sft-real, rm-real, dpo-real

Where the README's memory breakdown comes from; `/usr/bin/time -f %M` around it gives the process's max RSS.
"""
import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]
os.environ.setdefault("TQDM_DISABLE", "1")
PEAK = [0.0]


def rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1e6
    return 0.0


def mark(name: str) -> None:
    print(f"{name:<32} rss {rss_gb():6.3f} GB   peak so far {PEAK[0]:6.3f} GB", flush=True)


def sample() -> None:
    while True:
        PEAK[0] = max(PEAK[0], rss_gb())
        time.sleep(0.02)


def around(module, name: str) -> None:
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        mark(f"before {name}")
        result = original(*args, **kwargs)
        mark(f"after {name}")
        return result

    setattr(module, name, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", choices=("sft-real", "rm-real", "dpo-real"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # stage arguments, after --
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    threading.Thread(target=sample, daemon=True).start()
    import transformers

    import workers
    from stages.core import fastpath, policy

    mark("imports")
    around(policy, "build_policy")
    around(fastpath, "bf16_frozen_weights")
    original_train = transformers.Trainer.train

    def train(self, *args, **kwargs):
        class EachStep(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                mark(f"step {state.global_step}")

        mark("train start")
        self.add_callback(EachStep())
        return original_train(self, *args, **kwargs)

    transformers.Trainer.train = train
    stage = a.run.split("-")[0]
    with tempfile.TemporaryDirectory() as tmp:
        workers.w_stage_real({"model": a.model, "steps": a.steps, "tmp": tmp}, stage, stage, 2.0, tuple(extra))
    mark("end")


if __name__ == "__main__":
    main()
