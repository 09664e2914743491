"""Stage outputs: work directory, checkpoints, atomic finalisation and the manifest.

Layout for `output_dir = runs/x/sft`:
    runs/x/.sft.work/checkpoints/   trainer checkpoints (resume reads the last one)
    runs/x/.sft.work/logs/          TensorBoard event files while training
    runs/x/.sft.work/staging/       the finished artifact being assembled
    runs/x/sft/                     appears only by atomic rename of staging, manifest status "complete"
A crash therefore never leaves a complete-looking stage, and the rename never touches checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
COMPLETE = "complete"
_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "deepspeed")


def fingerprint(obj) -> str:
    """A stable sha256 of any JSON-serialisable object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_manifest(path: str | Path) -> dict | None:
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(path: str | Path) -> bool:
    m = read_manifest(path)
    return bool(m and m.get("status") == COMPLETE)


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES + ("rlhf-suite",):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


WORK_STATE = "work.json"  # the work dir's owner and the fingerprint its checkpoints and caches belong to
# what StageRun and the PPO stage write in a work folder
WORK_ENTRIES = {WORK_STATE, "checkpoints", "logs", "staging", "previous", "reference", "vllm_base", "vllm_adapters",
                "vllm_server.log"}
SUITE_EXTRAS = {"report.html", ".report.html.tmp"}  # written into a finished output later (`rlhf report`)


def work_dir(output_dir: Path) -> Path:
    """Where a stage keeps an output's checkpoints, logs and staging copy: a hidden sibling folder."""
    return output_dir.parent / f".{output_dir.name}.work"


def is_suite_work_dir(path: Path) -> bool:
    """Whether a work folder is one the suite made: it holds the lifecycle's record (work.json), or only what the
    suite puts there (a run killed before the record was written), and nothing else."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return WORK_STATE in names or all(n in WORK_ENTRIES or n.endswith("_metrics.json") for n in names)


def foreign_entries(output_dir: Path, manifest: dict) -> list[str]:
    """What an output folder holds beyond the files its manifest lists (something a user or another run put
    there); empty for manifests written before the suite listed its files."""
    listed = manifest.get("files")
    if not isinstance(listed, list) or not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name not in set(listed) | SUITE_EXTRAS)


@dataclass
class StageOutput:
    """Paths and lifecycle of one stage's output directory."""

    output_dir: Path
    stage: str
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.output_dir = Path(self.output_dir).expanduser().resolve()
        self.work = work_dir(self.output_dir)
        self.checkpoints = self.work / "checkpoints"
        self.logs = self.work / "logs"
        self.staging = self.work / "staging"

    def prepare(self, *, main: bool = True) -> None:
        """Create the work dirs. Only the main process deletes (a stale staging dir); other ranks only create."""
        for d in (self.checkpoints, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        if not main:
            return
        if self.staging.exists():  # a crash during a previous finalisation: start the artifact afresh
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)

    @property
    def lock_path(self) -> Path:
        return self.output_dir.parent / f".{self.output_dir.name}.lock"

    def checkpoints_newest_first(self) -> list[Path]:
        """Complete checkpoints, newest first. The trainer writes trainer_state.json last, so a checkpoint
        without it (or with a damaged one) was cut short, e.g. by a kill while saving, and is skipped."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        complete = []
        for p in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
            try:
                json.loads((p / "trainer_state.json").read_text())
            except (OSError, ValueError):
                continue
            complete.append(p)
        return complete

    def last_checkpoint(self) -> str | None:
        found = self.checkpoints_newest_first()
        return str(found[0]) if found else None

    def existing(self) -> dict | None:
        """The manifest of a finished output at this path, if there is one."""
        return read_manifest(self.output_dir) if is_complete(self.output_dir) else None

    def finalize(self, manifest: dict, *, keep_checkpoints: bool = False) -> Path:
        """Write the manifest into staging, copy logs, then atomically swap staging into place."""
        if self.logs.is_dir() and any(self.logs.iterdir()):
            shutil.copytree(self.logs, self.staging / "logs", dirs_exist_ok=True)
        files = sorted({p.name for p in self.staging.iterdir()} | {MANIFEST})
        manifest = dict(manifest, status=COMPLETE, stage=self.stage, files=files,
                        started_at=_iso(self.started), finished_at=_iso(time.time()),
                        duration_s=round(time.time() - self.started, 1))
        from .secrets import scrub

        write_json(self.staging / MANIFEST, scrub(json.loads(json.dumps(manifest, default=str))), sort_keys=True)
        old = None
        if self.output_dir.exists():
            prev = read_manifest(self.output_dir)
            if not self.output_dir.is_dir() or (any(self.output_dir.iterdir()) and (prev or {}).get("stage") != self.stage) \
                    or foreign_entries(self.output_dir, prev or {}):
                raise RuntimeError(f"{self.output_dir} changed during the run and is not a {self.stage} output; "
                                   f"the finished artifact stays in {self.staging}")
            old = self.work / "previous"
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.output_dir, old)
        os.replace(self.staging, self.output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if not keep_checkpoints:
            shutil.rmtree(self.work, ignore_errors=True)
        return self.output_dir


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parent_info(model_path: str) -> dict:
    """Lineage of the model a stage starts from: a suite output (with its manifest) or an external model."""
    p = Path(model_path)
    m = read_manifest(p) if p.is_dir() else None
    if m:
        return {"path": str(p.resolve()), "stage": m.get("stage"), "fingerprint": m.get("fingerprint"),
                "base_model": m.get("base_model")}
    return {"path": model_path, "stage": None, "fingerprint": None}


def write_json(path: Path, obj, *, sort_keys: bool = False) -> None:
    """Atomic write through a uniquely named temporary file (concurrent writers never share one)."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2, default=str, sort_keys=sort_keys))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
