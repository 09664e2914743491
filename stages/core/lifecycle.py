"""One lifecycle every stage goes through (`StageRun`):

    parse -> check the output path -> load + validate data -> fingerprint (from content, no model loaded)
    -> lock -> skip (same fingerprint, complete) or resume (only a checkpoint made under the same
    fingerprint) -> [the stage builds its model and trainer] -> evaluate before -> train -> evaluate after
    -> save artifact + manifest + card (atomic) -> release.

A stage module keeps only what differs (its model task, encoder, trainer, metrics):

    with StageRun("sft", argv) as run:       # or: return run_stage("sft", argv, train)
        if run.done:
            return run.output_dir
        ...build policy, encode run.data, make the trainer with callbacks=run.callbacks()...
        base = run.evaluate_before(trainer, "base", disable_adapter=True)
        run.train(trainer)
        return run.save_trainer(trainer, policy, manifest)
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import artifacts, distributed, fingerprints, runtime
from .artifacts import StageOutput
from .errors import ConfigError
from .safety import Lock, check_output_dir
from .stage import export_recipe_env, load_stage_data, log, parse_stage

WORK_STATE = artifacts.WORK_STATE
CHECKPOINT_FINGERPRINT = "suite_fingerprint.json"


def checkpoint_fingerprint(ckpt: Path) -> str | None:
    """The fingerprint a checkpoint was made under: ours beside the trainer's files, or in PPO's state."""
    f = Path(ckpt) / CHECKPOINT_FINGERPRINT
    try:
        if f.is_file():
            return json.loads(f.read_text()).get("fingerprint")
        return json.loads((Path(ckpt) / "trainer_state.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def run_stage(stage: str, argv, train, **kwargs):
    """A stage module's main: the lifecycle around its `train(run)` (skipped when nothing is to do)."""
    with StageRun(stage, argv) as run:
        return run.output_dir if run.done else train(run, **kwargs)


def fingerprint_of(stage: str, argv: list[str]) -> tuple[str, dict]:
    """A stage's fingerprint and inputs from its command-line arguments, without loading any model (chains)."""
    from stages import registry

    if registry.get(stage).config is None:
        import importlib

        return importlib.import_module(registry.get(stage).module).fingerprint_for(argv)
    run = StageRun(stage, argv, apply_env=False)
    return run.fingerprint, run.components


class StageRun:
    """The lifecycle of one stage run; see the module docstring."""

    def __init__(self, stage: str, argv=None, *, config_cls=None, parsed=None, output_dir=None, components=None,
                 force: bool | None = None, data=None, inputs=(), apply_env: bool = True):
        from stages import registry

        self.stage, self.spec = stage, registry.get(stage)
        self.main = runtime.is_main_process()
        self.args = parsed
        if parsed is None and (config_cls or self.spec.config):
            if apply_env:
                export_recipe_env(argv)  # before TRL/transformers import: they read some variables at import
            self.args = parse_stage(config_cls or self.spec.config_class(), argv, stage=stage)
        a = self.args
        out_dir = output_dir or a.training.output_dir
        if a is not None:
            inputs = [a.model.model_name_or_path, getattr(a.training, "reward_model", None), *self._data_paths()]
        self.output_dir = check_output_dir(out_dir, stage, inputs=inputs)
        self.out = StageOutput(self.output_dir, stage)
        self.force = bool(a.run.force if force is None else force)
        self.data = data
        if a is not None and data is None and self.spec.data_task:
            self.data = (registry.load(self.spec.data_loader)(a) if self.spec.data_loader
                         else load_stage_data(a, self.spec.data_task))
            log(stage, self.data.report.summary())
        self.components = components if components is not None else fingerprints.stage_components(
            stage, a, self.data.report.to_dict() if self.data is not None else None)
        self.fingerprint = fingerprints.of(self.components)
        self.lock = Lock(self.out.lock_path, f"output_dir {self.output_dir}")
        self.done, self.resume_from, self.started = False, None, time.time()

    def _data_paths(self) -> list[str]:
        d = self.args.data
        paths = []
        for src in (d.datasets or []) + (d.eval_datasets or []):
            p = src.get("path") if isinstance(src, dict) else src
            if isinstance(p, str):
                paths.append(p)
        return paths

    # -- lock, skip, resume -------------------------------------------------------------------------
    def __enter__(self) -> "StageRun":
        if self.main:
            self.lock.acquire(log=lambda m: log(self.stage, m))
        try:
            self._decide()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc):
        self.lock.release()

    def _decide(self) -> None:
        m = self.out.existing()
        if m is not None:
            if m.get("fingerprint") == self.fingerprint:
                log(self.stage, f"{self.output_dir} is complete with the same config and data; nothing to do")
                self.done = True
                return
            if not self.force:
                what = ", ".join(fingerprints.changed(m.get("inputs"), self.components))
                raise ConfigError(f"output_dir: {self.output_dir} holds a finished {m.get('stage')} stage made from "
                                  f"different inputs ({what}); choose another output_dir or pass --force true to replace it")
            foreign = artifacts.foreign_entries(self.output_dir, m)
            if foreign:
                raise ConfigError(f"output_dir: {self.output_dir} also holds what the {m.get('stage')} stage did not "
                                  f"write ({', '.join(foreign[:5])}); replacing it would delete them: move them out "
                                  "or choose another output_dir")
        self.resume_from = self._resume_checkpoint()

    def _work_state(self) -> dict | None:
        try:
            return json.loads((self.out.work / WORK_STATE).read_text())
        except (OSError, ValueError):
            return None

    def _resume_checkpoint(self) -> str | None:
        """The newest complete checkpoint made under this fingerprint; a different one stops the stage."""
        state = self._work_state()
        ckpts = self.out.checkpoints_newest_first()
        if state is not None:  # written by this lifecycle: a checkpoint without our record was cut short
            ckpts = [c for c in ckpts if checkpoint_fingerprint(c) is not None]
        if not ckpts:
            return None
        recorded = checkpoint_fingerprint(ckpts[0])
        if recorded == self.fingerprint:
            log(self.stage, f"resuming from {ckpts[0]}")
            return str(ckpts[0])
        if self.force:
            log(self.stage, f"--force: discarding the checkpoints in {self.out.work} (made from other inputs)")
            return None
        if recorded is None:
            why = "it was made before the suite recorded fingerprints in checkpoints, so it counts as not matching"
        else:
            why = "inputs changed since: " + ", ".join(fingerprints.changed((state or {}).get("inputs"), self.components))
        raise ConfigError(f"{self.stage}: {ckpts[0]} cannot be resumed: {why}. Re-run with --force true to start "
                          "afresh (nothing is deleted without it)")

    # -- training ----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Work dirs (checkpoints, logs, staging), threads and distributed set-up; the trainer writes there."""
        state = self._work_state()
        if self.main and self.out.work.exists() and (state is None or state.get("fingerprint") != self.fingerprint) \
                and self.resume_from is None:
            shutil.rmtree(self.out.work)  # the suite's own work dir, from other inputs (or --force): start afresh
        self.out.prepare(main=self.main)
        if self.main:
            artifacts.write_json(self.out.work / WORK_STATE, {"fingerprint": self.fingerprint, "inputs": self.components,
                                                              "stage": self.stage, "pid": os.getpid()})
        if self.args is None:
            return
        t = self.args.training
        t.output_dir = str(self.out.checkpoints)
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.out.logs)
        threads = runtime.configure_threads(self.args.run.num_threads)
        if self.args.run.return_freed_memory and runtime.on_cpu(t):
            runtime.return_freed_memory()
        distributed.setup_distributed(t)
        dev = "cpu" if runtime.on_cpu(t) else "cuda"
        prec = "bf16" if getattr(t, "bf16", False) else "fp16" if getattr(t, "fp16", False) else "fp32"
        log(self.stage, f"device {dev}, precision {prec}, {threads} CPU threads, gradient checkpointing "
                        f"{'on' if getattr(t, 'gradient_checkpointing', False) else 'off'}")

    def callbacks(self) -> list:
        """Early stopping (when asked), the fingerprint record written into every checkpoint, the time-left estimate."""
        from transformers import EarlyStoppingCallback, TrainerCallback

        run = self

        class RecordFingerprint(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                    if ckpt.is_dir():
                        artifacts.write_json(ckpt / CHECKPOINT_FINGERPRINT, {"fingerprint": run.fingerprint})

        cbs = [RecordFingerprint(), self.progress()]
        plan = self.args.__dict__.get("activation_plan")
        if plan:
            from .memory import SelectiveCheckpointing

            cbs.append(SelectiveCheckpointing(*plan))
        if self.args.run.early_stopping_patience:
            cbs.append(EarlyStoppingCallback(self.args.run.early_stopping_patience, self.args.run.early_stopping_threshold))
        return cbs

    def progress(self):
        """Steps done, seconds per step and the time left, printed at log steps (stages/core/progress.py)."""
        from .progress import Progress

        def write(message: str) -> None:
            if runtime.is_main_process():  # above the trainer's progress bar, not appended to it
                from tqdm.auto import tqdm

                tqdm.write(f"[{self.stage}] {message}")

        return Progress(write)

    def cached(self, name: str, compute):
        """A before-training figure computed once per fingerprint (the work dir is this fingerprint's)."""
        cache = self.out.work / f"{name}_metrics.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        value = compute()
        if value is not None and self.main:
            artifacts.write_json(cache, value)
        return value

    def evaluate_before(self, trainer, prefix: str, *, disable_adapter: bool) -> dict | None:
        """Validation metrics before training (prefix "base": adapters disabled; "start": the model as built)."""
        if trainer.eval_dataset is None:
            return None
        return _evaluate_before(trainer, self, prefix, disable_adapter)

    def train(self, trainer):
        return trainer.train(resume_from_checkpoint=self.resume_from)

    # -- saving ------------------------------------------------------------------------------------------
    def manifest(self, policy, summary: dict, **extra) -> dict:
        """The fields every manifest has: lineage, inputs and their fingerprint, derived machine choices."""
        from .config import to_plain

        a = self.args
        config = {name: to_plain(g) for name, g in a.groups.items()}
        derived = runtime.derived_choices(a.training)
        split = a.__dict__.get("micro_batch")
        if split:  # the recipe's batch in `config` (lineage, cards, reports); how it was trained in `derived`
            config["training"].update(split["recipe"])
            derived["micro_batch"] = {k: v for k, v in split.items() if k != "recipe"}
        return {
            "fingerprint": self.fingerprint, "inputs": self.components,
            "base_model": policy.base_model, "parent": artifacts.parent_info(policy.source),
            "merged_adapter": policy.merged_adapter, "peft_method": policy.method, "trainable": summary,
            "config": config, "derived": derived, "recipe_path": a.config_path, "command": a.command,
            "data": self.data.report.to_dict() if self.data is not None else None,
            "packages": artifacts.package_versions(), "git_commit": artifacts.git_commit(), **extra}

    def save_trainer(self, trainer, policy, manifest: dict) -> Path | None:
        """An HF Trainer's model/adapter + tokenizer, metrics, curves, card and manifest, swapped into place."""
        trainer.save_model(str(self.out.staging))
        trainer.accelerator.wait_for_everyone()
        if not trainer.is_world_process_zero():
            return None
        (self.out.staging / "training_args.bin").unlink(missing_ok=True)  # pickled; the manifest holds the config
        return self.save(policy, manifest, trainer.state.log_history)

    def save(self, policy, manifest: dict, history: list) -> Path:
        """Main process only: everything but the weights (already in staging), then the atomic swap."""
        staging = self.out.staging
        policy.tokenizer.save_pretrained(str(staging))
        acfg = staging / "adapter_config.json"
        if acfg.is_file():  # point the adapter at the model it was trained on, as the user named it
            cfg = json.loads(acfg.read_text())
            src = policy.adapter_base or policy.source
            cfg["base_model_name_or_path"] = str(Path(src).resolve()) if Path(src).exists() else src
            acfg.write_text(json.dumps(cfg, indent=2))
        artifacts.write_json(staging / "metrics.json", {**manifest.get("metrics", {}), "log_history": history})
        try:
            from .plots import plot_curves

            plot_curves(history, staging / "curves.png", title=f"{self.stage}: {self.output_dir.name}", stage=self.stage,
                        metrics=manifest.get("metrics"))
        except Exception as e:  # a plot must never cost the artifact
            log(self.stage, f"could not draw curves.png: {e}")
        try:
            from .modelcard import write_model_card

            write_model_card(staging, dict(manifest, stage=self.stage))
        except Exception as e:  # a model card must never cost the artifact
            log(self.stage, f"could not write the model card: {e}")
        final = self.out.finalize(manifest, keep_checkpoints=self.args.run.keep_checkpoints)
        log(self.stage, f"wrote {final}")
        return final


def _evaluate_before(trainer, run: StageRun, prefix: str, disable_adapter: bool) -> dict:
    return run.cached(prefix, lambda: _evaluate(trainer, run.stage, prefix, disable_adapter))


def _evaluate(trainer, stage: str, prefix: str, disable_adapter: bool) -> dict:
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
    return {(prefix + k[4:] if k.startswith("eval_") else k): v for k, v in metrics.items()}


_evaluate_before = distributed.at_train_start(_evaluate_before)  # DDP/DeepSpeed wrap the model in train()
