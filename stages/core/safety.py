"""What the suite promises about your files: it deletes or replaces only what it wrote.

- An output path is checked at start, before any weights load: a regular file, a symbolic link, `.`,
  the home directory, `/`, a folder holding files the suite did not write, a previous output of another
  stage, a folder equal to, inside, or above an input (model, data, reward model) are refused (exit 2).
  `--force` replaces only a previous suite output of the same stage.
- One lock per output dir and per chain run dir: a second run is refused naming the holder's pid and
  host; a lock left by a process that died on this host is taken over; on another host it is reported.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from . import artifacts
from .errors import ConfigError

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _input_paths(inputs) -> list[Path]:
    out = []
    for value in inputs or ():
        if not value or not isinstance(value, (str, Path)):
            continue
        p = Path(str(value)).expanduser()
        if p.exists():
            out.append(p.resolve())
    return out


def check_output_dir(output_dir, stage: str, *, inputs=(), key: str = "output_dir") -> Path:
    """Refuse an output path the suite must not write to; returns the resolved path."""
    raw = Path(str(output_dir)).expanduser()
    if raw.is_symlink():
        raise ConfigError(f"{key}: {output_dir} is a symbolic link; give the real directory")
    path = raw.resolve()
    if path in (Path.home().resolve(), Path(path.anchor), Path.cwd().resolve()):
        raise ConfigError(f"{key}: {output_dir} is {'the home directory' if path == Path.home().resolve() else 'the current directory' if path == Path.cwd().resolve() else 'the file-system root'}; "
                          "give a directory of its own, e.g. runs/NAME")
    for src in _input_paths(inputs):
        if path == src or path in src.parents:
            raise ConfigError(f"{key}: {output_dir} contains the input {src}; choose another output_dir")
        if src.is_dir() and src in path.parents:
            raise ConfigError(f"{key}: {output_dir} is inside the input directory {src}; choose another output_dir")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {output_dir} exists and is a file; the suite never replaces it")
    for parent in path.parents:
        outer = artifacts.read_manifest(parent)
        if outer and outer.get("stage"):  # replacing that output (--force) would delete this one with it
            raise ConfigError(f"{key}: {output_dir} is inside the {outer.get('stage')} stage output {parent}; "
                              "choose a directory outside it")
    work = artifacts.work_dir(path)
    if work.exists() and not artifacts.is_suite_work_dir(work):
        found = sorted(p.name for p in work.iterdir())[:5] if work.is_dir() else []
        raise ConfigError(f"{key}: {work}, where the suite keeps the checkpoints of {output_dir}, holds what the suite "
                          f"did not write{' (' + ', '.join(found) + ')' if found else ''}; nothing there is touched: "
                          "move it away or choose another output_dir")
    if path.is_dir() and any(path.iterdir()):
        m = artifacts.read_manifest(path)
        if m is None or not m.get("stage"):
            raise ConfigError(f"{key}: {output_dir} holds files the suite did not write (no manifest.json); "
                              "nothing there is touched: choose another output_dir")
        if m.get("stage") != stage:
            raise ConfigError(f"{key}: {output_dir} holds a '{m.get('stage')}' stage output; a {stage} stage "
                              f"(even with --force) replaces only a previous {stage} output")
    return path


def check_stage_name(name: str, run_dir: Path, where: str) -> Path:
    """A chain stage's name is a plain folder name and its output stays inside run_dir."""
    if not isinstance(name, str) or not STAGE_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"{where}: stage name {name!r} must match [A-Za-z0-9][A-Za-z0-9._-]*")
    out = (run_dir / name).resolve()
    if out.parent != run_dir.resolve():
        raise ConfigError(f"{where}: stage name {name!r} leaves run_dir {run_dir}")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """An exclusive lock file (O_EXCL create) holding {pid, host, started}; a context manager."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.held = Path(path), what, False

    def acquire(self, log=None) -> "Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written this instant, or unreadable: look again
                    time.sleep(0.2)
                    holder = self._holder()
                if holder is not None and holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                    if log:
                        log(f"taking over the lock {self.path} left by process {holder.get('pid')}, which is gone")
                    self.path.unlink(missing_ok=True)
                    continue
                if holder is None:
                    raise ConfigError(f"{self.what} is locked ({self.path} is unreadable); remove it if no run is using it")
                where = "this host" if holder.get("host") == me["host"] else f"host {holder.get('host')}"
                raise ConfigError(f"{self.what} is in use by process {holder.get('pid')} on {where} (lock {self.path}); "
                                  "wait for it to finish" + ("" if where == "this host" else
                                                             ", or remove the lock if that run is gone"))
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ConfigError(f"{self.what}: could not take the lock {self.path}")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
