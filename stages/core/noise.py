"""Known-harmless third-party messages, silenced so that what a run prints is the user's business.

Every entry names where the message comes from, the exact text it starts with, and why it is
harmless. Only these are silenced; any other warning or log line passes through unchanged. `--verbose`
on a stage or `rlhf run` (or RLHF_SUITE_VERBOSE=1 in the environment, which `rlhf run --verbose`
passes to its stages) installs nothing, so every line shows.

`install()` runs first thing in `rlhf` and in every stage's `cli()` (stages/core/stage.run_cli), before
transformers, bitsandbytes or DeepSpeed are imported: some of these lines are printed at import.
"""
from __future__ import annotations

import builtins
import logging
import os
import re
import warnings
from dataclasses import dataclass

VERBOSE_ENV = "RLHF_SUITE_VERBOSE"


@dataclass(frozen=True)
class Noise:
    kind: str  # "log" (a logging record), "warning" (warnings.warn) or "pip" (a line pip prints)
    where: str  # the logger name, the warning category, or "pip"
    text: str  # regular expression the message starts with
    why: str  # why it is harmless
    check: str | None = None  # name of a further test of the whole message (in this module)


KNOWN: tuple[Noise, ...] = (
    Noise("log", "bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community",
          "bitsandbytes (imported by transformers/PEFT) tries an optional downloadable CPU kernel at import and falls "
          "back to its built-in one; only QLoRA on CPU uses it, and it trains correctly without"),
    Noise("log", "kernels._internals.hf_hub",
          r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
          "the same optional bitsandbytes kernel, looked up offline"),
    Noise("log", "DeepSpeed", r"Setting accelerator to CPU\. If you have GPU",
          "DeepSpeed's note on a machine without a GPU, printed when it is imported (by accelerate/TRL) even when "
          "DeepSpeed is not used; the suite logs the device it trains on itself"),
    Noise("warning", "FutureWarning", r"`gradient_checkpointing(_kwargs)?` is deprecated and will be removed in v6",
          "TRL's configs set transformers' old name gradient_checkpointing themselves; the recipe key works and "
          "transformers maps it to activation_checkpointing"),
    Noise("warning", "FutureWarning", r"`is_gradient_checkpointing` is deprecated and will be removed in v6",
          "TRL's trainers read the old attribute name; nothing for the user to change"),
    Noise("log", "transformers.modeling_utils", r"\S*ForSequenceClassification\S* LOAD REPORT",
          "a reward model (or classifier) built from a causal LM: the LM head is left out and the score head is "
          "new, which is what the stage means to do; silenced only when those are the report's only keys",
          check="only_new_score_head"),
    Noise("pip", "pip", r"WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.",
          "fetching the default model: an extra package index configured on the machine has no page for the "
          "wheel, and pip moves on to the next index"),
)

_installed = False


def verbose_requested(argv=None) -> bool:
    """True when `--verbose` is among the arguments (any value but false/0) or RLHF_SUITE_VERBOSE is set."""
    if os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    args = list(argv or [])
    for i, a in enumerate(args):
        if a == "--verbose":
            nxt = args[i + 1] if i + 1 < len(args) else ""
            return nxt.lower() not in ("false", "0", "no")
        if a.startswith("--verbose="):
            return a.split("=", 1)[1].lower() not in ("false", "0", "no")
    return False


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def only_new_score_head(message: str) -> bool:
    """A load report whose only rows are the LM head left out (UNEXPECTED) and the score head (MISSING)."""
    rows = [line.split("|") for line in _ANSI.sub("", message).splitlines()[1:] if "|" in line]
    keys = [(r[0].strip(), r[1].strip()) for r in rows if len(r) > 1 and r[0].strip() not in ("Key", "")
            and not set(r[0].strip()) <= set("-+")]
    return bool(keys) and all((k.startswith("lm_head.") and s == "UNEXPECTED") or
                              (k.startswith("score.") and s == "MISSING") for k, s in keys)


def is_noise(kind: str, where: str, message: str) -> bool:
    """Whether a message is one of KNOWN (matched from its start, then its `check`)."""
    text = _ANSI.sub("", message)
    return any(n.kind == kind and n.where == where and re.match(n.text, text)
               and (n.check is None or globals()[n.check](message)) for n in KNOWN)


class _LogFilter(logging.Filter):
    def __init__(self, name: str):
        super().__init__()
        self.logger_name = name

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format itself is not ours to judge
            return True
        return not is_noise("log", self.logger_name, message)


def install(verbose: bool = False) -> bool:
    """Silence the KNOWN messages in this process (once); with `verbose`, do nothing. Returns whether installed."""
    global _installed
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # stages started from here (rlhf run) show everything too
        return False
    if _installed:
        return True
    for n in KNOWN:
        if n.kind == "log":
            logger = logging.getLogger(n.where)
            if not any(isinstance(f, _LogFilter) for f in logger.filters):
                logger.addFilter(_LogFilter(n.where))
        elif n.kind == "warning":
            warnings.filterwarnings("ignore", message=n.text, category=getattr(builtins, n.where))
    _installed = True
    return True


def filter_lines(text: str, where: str = "pip") -> str:
    """`text` without the KNOWN lines of a tool's output (unless verbose); the rest unchanged."""
    if verbose_requested():
        return text
    return "".join(line for line in text.splitlines(keepends=True) if not is_noise(where, where, line))
