"""What every stage script does around its trainer: parse, set up, skip/resume, save, manifest.

A stage module stays a linear `main()`; the mechanics shared by all of them live here.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from . import artifacts, distributed, runtime  # distributed: see evaluate_before below
from .artifacts import StageOutput
from .config import DataArguments, ParsedArgs, PolicyArguments, RunArguments, parse_args, to_plain
from .errors import ConfigError, UserError


def log(stage: str, msg: str) -> None:
    if runtime.is_main_process():
        print(f"[{stage}] {msg}", flush=True)


def groups_for(config_cls) -> dict:
    from trl import ModelConfig, ScriptArguments

    return dict(script=ScriptArguments, training=config_cls, model=ModelConfig, policy=PolicyArguments,
                data=DataArguments, run=RunArguments)


def _adjust(recipe: dict, explicit: set[str]) -> None:
    """Hardware-dependent defaults plus evaluation/saving defaults that suit a validated, resumable stage."""
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


def parse_stage(config_cls, argv=None, *, stage: str | None = None) -> ParsedArgs:
    args = parse_args(groups_for(config_cls), argv, adjust=_adjust)
    if stage and args.command.startswith("rlhf-stage"):  # called in-process: record the equivalent CLI command
        args.command = "rlhf " + stage + args.command[len("rlhf-stage"):]
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
                       data_format=d.data_format, column_mapping=d.column_mapping, role_mapping=d.role_mapping)
    if d.max_train_rows is not None and len(loaded.train) > d.max_train_rows:
        loaded.train = loaded.train.select(range(d.max_train_rows))
    if d.max_eval_rows is not None and loaded.eval is not None and len(loaded.eval) > d.max_eval_rows:
        loaded.eval = loaded.eval.select(range(d.max_eval_rows))
    return loaded


def encode_split(fn, data, split: str, tokenizer, args: ParsedArgs, stage: str, **settings):
    """Tokenise one split with `fn`, through the tokenised-rows cache (token_cache.py)."""
    from .token_cache import encode_cached

    rows = data.train if split == "train" else data.eval
    fp = data.report.train_fingerprint if split == "train" else data.report.eval_fingerprint
    return encode_cached(fn, rows, tokenizer, rows_fingerprint=f"{fp}:{len(rows)}" if fp else None,
                         enabled=args.data.tokenized_cache, log=lambda m: log(stage, m), **settings)


def checkpointing_for_memory(args: ParsedArgs, model, stage: str, *, rows_per_example: int = 1) -> None:
    """CPU runs train without gradient checkpointing when memory allows; otherwise it goes back on."""
    t = args.training
    if runtime.cuda_available() or "gradient_checkpointing" in args.explicit or t.gradient_checkpointing:
        return
    tokens = t.per_device_train_batch_size * (t.max_length or 1024) * rows_per_example
    if runtime.checkpointing_needed(model.config, tokens):
        t.gradient_checkpointing = True
        need = runtime.activation_bytes(model.config, tokens) / 2**30
        log(stage, f"gradient checkpointing on: activations for {tokens} tokens need ~{need:.1f} GiB, over 80% "
                   "of the available memory (set gradient_checkpointing: false to insist)")


def log_fast_paths(trainer, stage: str, *, lm_head: bool = True) -> None:
    from .fastpath import install

    applied = install(trainer, lm_head=lm_head)
    if applied:
        log(stage, "CPU fast paths: " + ", ".join(applied))


def stage_fingerprint(args: ParsedArgs, data_report: dict) -> str:
    cfg = {name: to_plain(g) for name, g in args.groups.items()}
    for volatile in ("output_dir", "logging_dir", "resume_from_checkpoint", "report_to", "disable_tqdm"):
        cfg["training"].pop(volatile, None)
    cfg["run"].pop("force", None)
    cfg["run"].pop("keep_checkpoints", None)
    parent = artifacts.parent_info(args.model.model_name_or_path)
    return artifacts.fingerprint({"config": cfg, "data": data_report.get("fingerprints"), "parent": parent.get("fingerprint")})


def check_existing(out: StageOutput, fp: str, force: bool, stage: str) -> bool:
    """True when this exact stage is already complete (nothing to do)."""
    m = out.existing()
    if m is None:
        return False
    if m.get("fingerprint") == fp:
        log(stage, f"{out.output_dir} is complete with the same config and data; nothing to do")
        return True
    if not force:
        raise ConfigError(f"output_dir: {out.output_dir} holds a finished {m.get('stage')} stage with a different "
                          "config or data; choose another output_dir or pass --force to replace it")
    return False


def prepare_training(args: ParsedArgs, out: StageOutput, stage: str) -> None:
    """Point the trainer at the work dir (checkpoints, logs) and set threads."""
    out.prepare()
    args.training.output_dir = str(out.checkpoints)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out.logs)
    threads = runtime.configure_threads(args.run.num_threads)
    from .distributed import setup_distributed

    setup_distributed(args.training)
    dev = "cuda" if runtime.cuda_available() else "cpu"
    prec = "bf16" if args.training.bf16 else "fp16" if args.training.fp16 else "fp32"
    log(stage, f"device {dev}, precision {prec}, {threads} CPU threads, gradient checkpointing "
               f"{'on' if args.training.gradient_checkpointing else 'off'}")


def callbacks(args: ParsedArgs) -> list:
    from transformers import EarlyStoppingCallback

    cbs = []
    if args.run.early_stopping_patience:
        cbs.append(EarlyStoppingCallback(args.run.early_stopping_patience, args.run.early_stopping_threshold))
    return cbs


def evaluate_before(trainer, out: StageOutput, stage: str, *, prefix: str, disable_adapter: bool) -> dict | None:
    """Validation metrics before training, cached across resumes.

    prefix "base": the starting model with adapters disabled (SFT's "compare with the base model").
    prefix "start": the untrained starting point as built (e.g. a reward model's fresh head).
    """
    cache = out.work / f"{prefix}_metrics.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if trainer.eval_dataset is None:
        return None
    log(stage, f"evaluating the {'starting model' if disable_adapter else 'untrained start'} on the validation split")
    from transformers import EarlyStoppingCallback

    model = trainer.model
    stopper = trainer.pop_callback(EarlyStoppingCallback)  # a "before" evaluation is not a training evaluation
    try:
        if disable_adapter and hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
            with model.disable_adapter():
                metrics = trainer.evaluate(metric_key_prefix=prefix)
        else:
            metrics = trainer.evaluate(metric_key_prefix=prefix)
    finally:
        if stopper is not None:
            trainer.add_callback(stopper)
    # TRL logs its own metrics under "eval_" whatever the prefix: file them under the prefix asked for
    metrics = {(prefix + k[4:] if k.startswith("eval_") else k): v for k, v in metrics.items()}
    if runtime.is_main_process():
        artifacts.write_json(cache, metrics)
    return metrics


evaluate_before = distributed.at_train_start(evaluate_before)  # DDP/DeepSpeed wrap the model in train(): distributed.py


def evaluate_base(trainer, out: StageOutput, stage: str) -> dict | None:
    return evaluate_before(trainer, out, stage, prefix="base", disable_adapter=True)


def evaluate_start(trainer, out: StageOutput, stage: str) -> dict | None:
    return evaluate_before(trainer, out, stage, prefix="start", disable_adapter=False)


def save_artifact(trainer, policy, out: StageOutput, manifest: dict, stage: str, keep_checkpoints: bool) -> Path | None:
    """Save model/adapter + tokenizer into staging, write metrics and manifest, swap into place."""
    trainer.save_model(str(out.staging))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    policy.tokenizer.save_pretrained(str(out.staging))
    # safetensors only: the trainer's pickled training_args.bin is dropped (the manifest holds the config)
    (out.staging / "training_args.bin").unlink(missing_ok=True)
    acfg = out.staging / "adapter_config.json"
    if acfg.is_file():  # point the adapter at the model it was trained on, as the user named it
        cfg = json.loads(acfg.read_text())
        src = policy.adapter_base or policy.source
        cfg["base_model_name_or_path"] = str(Path(src).resolve()) if Path(src).exists() else src
        acfg.write_text(json.dumps(cfg, indent=2))
    history = trainer.state.log_history
    artifacts.write_json(out.staging / "metrics.json", {**manifest.get("metrics", {}), "log_history": history})
    try:
        from .plots import plot_curves

        plot_curves(history, out.staging / "curves.png", title=f"{stage}: {Path(out.output_dir).name}")
    except Exception as e:  # a plot must never cost the artifact
        log(stage, f"could not draw curves.png: {e}")
    try:
        from .modelcard import write_model_card

        write_model_card(out.staging, dict(manifest, stage=stage))
    except Exception as e:  # a model card must never cost the artifact
        log(stage, f"could not write the model card: {e}")
    final = out.finalize(manifest, keep_checkpoints=keep_checkpoints)
    log(stage, f"wrote {final}")
    return final


def best_eval(history: list[dict], key: str = "eval_loss", lower_is_better: bool = True):
    """The best value of an evaluation metric over training (None when never evaluated)."""
    values = [h[key] for h in history if key in h]
    if not values:
        return None
    return min(values) if lower_is_better else max(values)


def base_manifest(args: ParsedArgs, policy, data, fp: str, summary: dict) -> dict:
    return {
        "fingerprint": fp,
        "base_model": policy.base_model,
        "parent": artifacts.parent_info(policy.source),
        "merged_adapter": policy.merged_adapter,
        "peft_method": policy.method,
        "trainable": summary,
        "config": {name: to_plain(g) for name, g in args.groups.items()},
        "recipe_path": args.config_path,
        "command": args.command,
        "data": data.report.to_dict(),
        "packages": artifacts.package_versions(),
        "git_commit": artifacts.git_commit(),
    }


def run_cli(main, argv=None) -> int:
    """Run a stage main: user errors print one line and exit 2; nothing half-written is left as complete."""
    try:
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
