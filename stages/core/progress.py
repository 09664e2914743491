"""A stage's remaining time, estimated from its own step rate and printed at each log step (main process).

The rate is measured from the first step this process ran (a resumed run does not count the steps its
checkpoint already held), so the estimate is "steps left x seconds per step so far".
"""
from __future__ import annotations

import time

from transformers import TrainerCallback


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(step: int, total: int, first_step: int, elapsed: float, unit: str = "step") -> str | None:
    """'step 40/120 (33%), 1.20 s/step, about 1.6 min left' (None before any step was timed)."""
    done = step - first_step
    if total <= 0 or done <= 0:
        return None
    per_step = elapsed / done
    return (f"{unit} {step}/{total} ({100 * step / total:.0f}%), {per_step:.2f} s/{unit}, "
            f"about {format_duration(per_step * (total - step))} left")


class Progress(TrainerCallback):
    """Prints progress_line at every log step of an HF Trainer, and after every update of the PPO trainer."""

    def __init__(self, log, clock=time.monotonic):
        self.log, self.clock = log, clock
        self.first_step, self.started, self.reported = None, None, None

    def _report(self, step: int, total: int, unit: str = "step") -> None:
        if self.first_step is None:
            self.first_step, self.started = step, self.clock()
            return
        line = progress_line(step, total, self.first_step, self.clock() - self.started, unit)
        if line and step != self.reported:  # a train and an eval log at the same step: one line
            self.reported = step
            self.log(line)

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step, self.started = state.global_step, self.clock()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and "train_runtime" not in (logs or {}):
            self._report(state.global_step, state.max_steps)

    def on_update_end(self, trainer, update, logs):  # stages/core/ppo/trainer.py: the first update sets the clock
        self._report(update, trainer.total_updates, "update")
