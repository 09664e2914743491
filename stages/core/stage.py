"""Pieces every stage script uses: parse (with the recipe's env first), data, encoding, logs, the CLI wrapper.

The lifecycle itself (fingerprint, lock, skip/resume, save) is lifecycle.StageRun.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from . import runtime
from .config import DataArguments, ParsedArgs, PolicyArguments, RunArguments, load_recipe, parse_args
from .errors import ConfigError, DataError, UserError


def log(stage: str, msg: str) -> None:
    if runtime.is_main_process():
        print(f"[{stage}] {msg}", flush=True)


def groups_for(config_cls) -> dict:
    from trl import ModelConfig, ScriptArguments

    return dict(script=ScriptArguments, training=config_cls, model=ModelConfig, policy=PolicyArguments,
                data=DataArguments, run=RunArguments)


def _adjust(recipe: dict, explicit: set[str]) -> None:
    """Hardware-dependent defaults plus evaluation/saving defaults that suit a validated, resumable stage."""
    for key in ("eval_strategy", "save_strategy", "logging_strategy"):
        if recipe.get(key) is False:  # YAML reads a bare `no` (recipe or `--eval_strategy no`) as false
            recipe[key] = "no"
    runtime.adjust_training_defaults(recipe, explicit)
    has_eval = bool(recipe.get("eval_datasets") or recipe.get("validation_fraction", 0.1) or recipe.get("validation_size")
                    or recipe.get("test_split_size"))
    if has_eval and "eval_strategy" not in explicit:
        recipe["eval_strategy"] = "epoch"
    if "save_strategy" not in explicit:
        recipe["save_strategy"] = recipe.get("eval_strategy", "epoch") if has_eval else "epoch"
        if "eval_steps" in recipe and "save_steps" not in explicit:
            recipe["save_steps"] = recipe["eval_steps"]
    if "save_total_limit" not in explicit:
        recipe["save_total_limit"] = 2
    if "logging_first_step" not in explicit:
        recipe["logging_first_step"] = True


def export_recipe_env(argv=None) -> dict:
    """Export the recipe's `env:` block now, before TRL/transformers/accelerate are imported (they read
    HF_HUB_OFFLINE, HF_HOME, TRANSFORMERS_VERBOSITY, ... at import)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return {}
    env = load_recipe(argv[argv.index("--config") + 1]).get("env") or {}
    if not isinstance(env, dict):
        raise ConfigError(f"{argv[argv.index('--config') + 1]}: env: must be a mapping of variable names to values")
    for k, v in env.items():
        os.environ[str(k)] = str(v)
    return env


def parse_stage(config_cls, argv=None, *, stage: str | None = None) -> ParsedArgs:
    from .secrets import scrub_command

    args = parse_args(groups_for(config_cls), argv, adjust=_adjust)
    if stage and args.command.startswith("rlhf-stage"):  # called in-process: record the equivalent CLI command
        args.command = "rlhf " + stage + args.command[len("rlhf-stage"):]
    args.command = scrub_command(args.command)
    validate_values(args)
    if stage:
        from .support import check_method

        check_method(stage, args.policy.resolve_method(args.model), args.config_path or "command line",
                     args.model.model_name_or_path)
    if not args.training.output_dir or args.training.output_dir == "trainer_output":
        if "output_dir" not in args.explicit:
            raise ConfigError("output_dir: required (where the stage writes its model and manifest)")
    t = args.training
    if args.run.early_stopping_patience:
        if str(getattr(t.eval_strategy, "value", t.eval_strategy)) == "no":
            raise ConfigError("early_stopping_patience: needs evaluation (eval_strategy steps or epoch and a validation split)")
        if str(getattr(t.save_strategy, "value", t.save_strategy)) != str(getattr(t.eval_strategy, "value", t.eval_strategy)):
            raise ConfigError("early_stopping_patience: save_strategy must equal eval_strategy to keep the best checkpoint")
        t.load_best_model_at_end = True
        if t.metric_for_best_model is None:
            t.metric_for_best_model, t.greater_is_better = "eval_loss", False
    return args


def validate_values(args: ParsedArgs) -> None:
    """Values that would only fail later (after weights load) are refused now, naming the key."""
    t, where = args.training, args.config_path or "command line"
    if getattr(t, "learning_rate", 1) is not None and t.learning_rate <= 0:
        raise ConfigError(f"{where}: learning_rate: must be positive, got {t.learning_rate}")
    for key in ("max_length", "max_prompt_length", "max_completion_length", "max_new_tokens"):
        v = getattr(t, key, None)
        if v is not None and not isinstance(v, bool) and v <= 0:
            raise ConfigError(f"{where}: {key}: must be positive, got {v}")
    if args.policy.resolve_method(args.model) in ("lora", "dora", "qlora") and args.model.lora_r <= 0:
        raise ConfigError(f"{where}: lora_r: must be positive, got {args.model.lora_r}")
    if t.num_train_epochs <= 0 and t.max_steps <= 0:
        raise ConfigError(f"{where}: num_train_epochs / max_steps: one must be positive")
    resume = getattr(t, "resume_from_checkpoint", None)
    if resume not in (None, "", False, True) and str(resume).lower() != "true":  # true: what every stage does anyway
        raise ConfigError(f"{where}: resume_from_checkpoint: a stage resumes by itself: re-run the same command and it "
                          "continues from its newest checkpoint made from the same config and data (in .NAME.work/); "
                          "a checkpoint from another run or config is never resumed. Remove this key")


def data_sources(args: ParsedArgs) -> tuple[list, list | None]:
    """Our `datasets` list, or TRL's `dataset_name` (+ train/test splits) when that is what the recipe gives."""
    if args.data.datasets:
        return list(args.data.datasets), args.data.eval_datasets
    name = args.script.dataset_name
    if not name:
        raise ConfigError("datasets: required (a list of files, Hub names or 'demo:NAME'), or TRL's dataset_name")
    train = [{"path": name, "name": args.script.dataset_config, "split": args.script.dataset_train_split}]
    evals = args.data.eval_datasets
    if evals is None and args.script.dataset_test_split and args.data.validation_fraction == 0:
        evals = [{"path": name, "name": args.script.dataset_config, "split": args.script.dataset_test_split}]
    return train, evals


def load_stage_data(args: ParsedArgs, task: str):
    from .data import load_data

    train, evals = data_sources(args)
    d = args.data
    loaded = load_data(train, task=task, eval_sources=evals, validation_fraction=d.validation_fraction,
                       validation_size=d.validation_size, seed=args.training.seed, on_invalid=d.on_invalid,
                       data_format=d.data_format, column_mapping=d.column_mapping, role_mapping=d.role_mapping,
                       rating_scale=d.rating_scale, rating_threshold=d.rating_threshold, pairs=d.pairs)
    for split, rows, sources in (("train", loaded.train, train), ("validation", loaded.eval, evals)):
        if sources and (rows is None or not len(rows)):
            raise ConfigError(f"{'datasets' if split == 'train' else 'eval_datasets'}: no {split} rows in "
                              f"{', '.join(str(s.get('path') if isinstance(s, dict) else s) for s in sources)}")
    if d.max_train_rows is not None and len(loaded.train) > d.max_train_rows:
        loaded.train = loaded.train.select(range(d.max_train_rows))
    if d.max_eval_rows is not None and loaded.eval is not None and len(loaded.eval) > d.max_eval_rows:
        loaded.eval = loaded.eval.select(range(d.max_eval_rows))
    strategy = getattr(args.training, "eval_strategy", "no")
    if (loaded.eval is None or not len(loaded.eval)) and str(getattr(strategy, "value", strategy)) != "no":
        if "eval_strategy" not in args.explicit and not args.run.early_stopping_patience:  # the stage's own default
            args.training.eval_strategy = "no"
            return loaded
        raise ConfigError(f"eval_strategy: {getattr(strategy, 'value', strategy)} evaluates on validation rows, but there "
                          f"are none (validation_fraction {d.validation_fraction:g}, no eval_datasets); set eval_strategy: "
                          "no, or give validation rows (validation_fraction, validation_size or eval_datasets)")
    return loaded


def encode_split(fn, data, split: str, tokenizer, args: ParsedArgs, stage: str, **settings):
    """Tokenise one split with `fn`, through the tokenised-rows cache (token_cache.py)."""
    from .token_cache import encode_cached

    rows = data.train if split == "train" else data.eval
    fp = data.report.train_fingerprint if split == "train" else data.report.eval_fingerprint
    try:
        return encode_cached(fn, rows, tokenizer, rows_fingerprint=f"{fp}:{len(rows)}" if fp else None,
                             enabled=args.data.tokenized_cache, log=lambda m: log(stage, m), **settings)
    except DataError as e:  # a row of the shuffled split: say which file and row it is
        raise data.locate(e, "train" if split == "train" else "eval") from None


def checkpointing_for_memory(args: ParsedArgs, model, stage: str, *, rows_per_example: int = 1,
                             longest: int | None = None, split_exact: bool = False) -> None:
    """On CPU, plan activation memory against `memory_budget_gb`: when a worst-case batch (every row as long
    as the longest training row, `longest` tokens before truncation, or max_length) would not fit, it is first
    split into micro-batches (`split_batch_for_memory`), then checkpointing goes on, and each training forward
    checkpoints only as many layers as its own rows and padded length need (stages/core/memory.py). GPUs and an explicit
    `gradient_checkpointing` keep the recipe's choice. `split_exact`: the stage's loss is a mean over the whole
    batch's examples (or labelled tokens) under gradient accumulation, so splitting cannot change it; losses
    estimated per batch (KTO's KL term, ORPO/CPO's token-mean NLL, classification's plain mean) are never split."""
    t = args.training
    if not runtime.on_cpu(t) or "gradient_checkpointing" in args.explicit or t.gradient_checkpointing:
        return
    budget = runtime.memory_budget(args.run.memory_budget_gb)
    if getattr(t, "packing", False) or not longest:  # packed rows fill max_length
        row = t.max_length or 1024
    else:
        row = min(t.max_length, longest) if t.max_length else longest
    half = half_precision(t)
    if runtime.activation_bytes(model.config, *batch_shape(t, t.per_device_train_batch_size, row, rows_per_example),
                                half=half) <= budget:
        return  # a worst-case batch fits: nothing to split or recompute
    distributed = getattr(t, "deepspeed", None) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if args.run.micro_batches_for_memory and split_exact and not distributed:  # DeepSpeed fixed its batch already
        split_batch_for_memory(args, model, stage, row, rows_per_example, budget)
    rows, length = batch_shape(t, t.per_device_train_batch_size, row, rows_per_example)
    keep = runtime.layers_without_checkpointing(model.config, rows, length, budget, half=half)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    if keep >= layers:
        return
    # transformers 5 reads `activation_checkpointing`; `gradient_checkpointing` is an alias resolved at __init__ only
    t.activation_checkpointing = t.gradient_checkpointing = True
    args.__dict__["activation_plan"] = (budget, *runtime.activation_rates(model.config, half=half))
    need = runtime.activation_bytes(model.config, rows, length, half=half) / 2**30
    log(stage, f"selective checkpointing: a worst-case batch ({rows} x {length} tokens, ~{need:.1f} GiB of "
               f"activations) checkpoints {layers - keep} of {layers} layers, shorter batches fewer, to stay within the "
               f"{budget / 2**30:.1f} GiB memory budget (memory_budget_gb; gradient_checkpointing: false turns it off)")


def half_precision(training_args) -> bool:
    """Whether activations are 16-bit (bf16 or fp16 autocast): the planner's per-width rates depend on it."""
    return bool(training_args.bf16 or training_args.fp16)


def batch_shape(training_args, examples: int, row: int, rows_per_example: int = 1) -> tuple[int, int]:
    """(rows, padded length) of a worst-case forward over `examples` examples of `rows_per_example` rows of
    `row` tokens: one sequence of them all when the batch is concatenated (padding-free, or TRL's default
    best-fit packing), where eager attention's square spans the whole batch."""
    t = training_args
    concatenated = bool(getattr(t, "padding_free", False) or (
        getattr(t, "packing", False) and getattr(t, "packing_strategy", "bfd") in ("bfd", "bfd_split")))
    return (1, examples * rows_per_example * row) if concatenated else (examples * rows_per_example, row)


PAD_MULTIPLE_FOR_REUSE = 32


def pad_lengths_for_reuse(args: ParsedArgs, stage: str) -> None:
    """On CPU, pad each batch to a multiple of 32 tokens unless the recipe sets `pad_to_multiple_of`. Batches
    of random lengths (reward pairs, one per micro-batch) otherwise allocate activations of a new size every
    step, and glibc's heap keeps the holes: real-length reward pairs grew from 1.7 to 2.5 GB over 10 steps,
    and stayed at 1.8 GB padded to 32, at the same step time (README, Speed). Padding is masked: the
    scores are unchanged."""
    t = args.training
    if not runtime.on_cpu(t) or "pad_to_multiple_of" in args.explicit or getattr(t, "padding_free", False):
        return
    if getattr(t, "pad_to_multiple_of", None) is None:
        t.pad_to_multiple_of = PAD_MULTIPLE_FOR_REUSE
        log(stage, f"batches padded to a multiple of {PAD_MULTIPLE_FOR_REUSE} tokens (fewer distinct tensor sizes, "
                   "less heap fragmentation on CPU; pad_to_multiple_of sets another)")


def padded_length(tokens: int | None, multiple: int | None) -> int | None:
    """A row of `tokens` tokens as the collator pads it (to a multiple of `multiple`)."""
    return -(-tokens // multiple) * multiple if tokens and multiple else tokens


MIN_MICRO_BATCH_TOKENS = 1024  # below this a CPU forward is dominated by per-op overhead, not matmuls


def split_batch_for_memory(args: ParsedArgs, model, stage: str, row: int, rows_per_example: int, budget: int) -> None:
    """Train a batch whose worst case would not fit `budget` as micro-batches: the largest divisor of
    `per_device_train_batch_size` whose worst case fits the budget or is at most MIN_MICRO_BATCH_TOKENS
    tokens (at least one example), with gradient accumulation multiplied to match. Every optimizer step sees
    the same rows and the same loss (a mean over the whole batch: transformers normalises accumulated losses
    by the batch's items), but each forward holds fewer activations and pads only to its own longest row
    (tests/test_memory_budget.py). The recipe's values are kept for the manifest (`args.micro_batch`)."""
    t = args.training
    batch, accumulation = t.per_device_train_batch_size, t.gradient_accumulation_steps
    half = half_precision(t)
    fits = [m for m in range(1, batch + 1) if batch % m == 0 and (
        m * rows_per_example * row <= MIN_MICRO_BATCH_TOKENS
        or runtime.activation_bytes(model.config, *batch_shape(t, m, row, rows_per_example), half=half) <= budget)]
    micro = max(fits, default=1)
    if micro == batch:
        return
    t.per_device_train_batch_size, t.gradient_accumulation_steps = micro, accumulation * (batch // micro)
    args.__dict__["micro_batch"] = {
        "recipe": {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation},
        "micro_batch_size": micro, "gradient_accumulation_steps": t.gradient_accumulation_steps}
    log(stage, f"micro-batches: each batch of {batch} trains as {batch // micro} micro-batches of {micro} "
               f"(gradient_accumulation_steps {t.gradient_accumulation_steps}; same rows and loss per step, less memory "
               f"and padding; micro_batches_for_memory: false keeps whole batches)")


def fast_path_flags(args: ParsedArgs) -> dict:
    """The recipe keys that turn each CPU fast path off (compact_lm_head, bf16_frozen_weights), and whether the run
    trains on the CPU at all."""
    return {"lm_head": args.run.compact_lm_head, "frozen_bf16": args.run.bf16_frozen_weights,
            "cpu": runtime.on_cpu(args.training)}


def log_fast_paths(trainer, stage: str, args: ParsedArgs, *, lm_head: bool = True) -> None:
    from .fastpath import install

    flags = fast_path_flags(args)
    applied = install(trainer, lm_head=lm_head and flags["lm_head"], frozen_bf16=flags["frozen_bf16"])
    if applied:
        log(stage, "CPU fast paths: " + ", ".join(applied))


def best_eval(history: list[dict], key: str = "eval_loss", lower_is_better: bool = True):
    """The best value of an evaluation metric over training (None when never evaluated)."""
    values = [h[key] for h in history if key in h]
    if not values:
        return None
    return min(values) if lower_is_better else max(values)


def recipe_says_verbose(argv: list[str]) -> bool:
    """The recipe's own `verbose: true` (read before any import that prints, as the `env:` block is)."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return False
    value = load_recipe(argv[argv.index("--config") + 1]).get("verbose", False)
    return value is True or str(value).lower() in ("true", "1", "yes")


def run_cli(main, argv=None) -> int:
    """Run a stage main: user errors print one line and exit 2; nothing half-written is left as complete.
    Known-harmless third-party warnings are silenced first (stages/core/noise.py; `--verbose` shows all).
    A launched rank leaves through `runtime.leave_distributed`, which ends its process."""
    try:
        code = _run_main(main, argv)
    except SystemExit as e:  # sys.exit inside a stage: a launched rank must still leave through leave_distributed
        if not runtime.in_process_group():
            raise
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    return runtime.leave_distributed(code)


def _run_main(main, argv) -> int:
    from . import noise

    try:
        args = list(sys.argv[1:] if argv is None else argv)
        noise.install(noise.verbose_requested(args) or recipe_says_verbose(args))
        main(argv)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1
