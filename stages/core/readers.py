"""Reading dataset sources: files (json, jsonl, csv, parquet), directories, save_to_disk folders,
Hub names and the built-in ``demo:NAME`` sets. Returns plain row dicts; conversion happens in data.py."""
from __future__ import annotations

import glob
import importlib
import json
import re
from pathlib import Path
from typing import Any

from .errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def _json_lines(text: str, label: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON on line {n}: {e.msg} (column {e.colno})", source=label) from None
        if not isinstance(obj, dict):
            raise DataError(f"line {n}: expected a JSON object, got {type(obj).__name__}", source=label)
        rows.append(obj)
    return rows


def _decode_cell(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "[{":
        try:
            obj = json.loads(v)
        except ValueError:
            return v
        if isinstance(obj, dict) or (isinstance(obj, list) and all(isinstance(x, dict) for x in obj)):
            return obj
    return v


def read_file(path: Path) -> list[dict]:
    """Rows of one .json/.jsonl/.csv/.parquet file (CSV cells holding JSON objects/lists are decoded)."""
    label, suffix = str(path), path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            try:
                obj = json.loads(text) if text.strip() else []
            except json.JSONDecodeError as e:
                if text.lstrip()[:1] == "[":
                    raise DataError(f"malformed JSON on line {e.lineno}: {e.msg}", source=label) from None
                obj = None  # not one document: JSON lines
            if isinstance(obj, dict):
                obj = [obj]
            if obj is not None:
                if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
                    raise DataError("expected a JSON array of objects (or JSON lines)", source=label)
                return obj
        return _json_lines(text, label)
    if suffix == ".csv":
        import pandas as pd

        df = pd.read_csv(path)
        return [{k: _decode_cell(v) for k, v in r.items()}
                for r in df.astype(object).where(df.notna(), None).to_dict("records")]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"unsupported file type '{suffix}'; expected one of {', '.join(SUFFIXES)}", source=label)


def _read_saved(path: Path, split: str | None) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(f"split '{split}' not found; splits: {', '.join(ds)}", source=str(path))
        ds = ds[split]
    return ds.to_list()


def _read_hub(spec: dict) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(spec["path"], spec.get("name"), data_dir=spec.get("data_dir"),
                                   data_files=spec.get("data_files"), split=spec.get("split") or "train")
    except Exception as e:  # offline, unknown name, bad config...
        raise DataError(f"no local file or directory of that name, and loading it as a Hub dataset failed: "
                        f"{type(e).__name__}: {e}", source=spec["path"]) from None
    return list(ds)


def _expand(patterns, base: Path | None, label: str) -> list[Path]:
    files = []
    for pat in [patterns] if isinstance(patterns, str) else patterns:
        pat = str(base / pat) if base is not None else str(pat)
        found = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        for f in found:
            if not Path(f).is_file():
                raise DataError(f"file not found: {f}", source=label)
            files.append(Path(f))
    return files


def read_source(spec: dict) -> list[tuple[str, list[dict]]]:
    """(file label, rows) pairs for one normalised source spec."""
    path = spec["path"]
    if path.startswith("demo:"):
        demo = importlib.import_module("stages.core.demo")
        return [(path, [dict(r) for r in demo.load(path[len("demo:"):])])]
    p = Path(path).expanduser()
    files = spec.get("data_files")
    if files is not None and (p.is_dir() or path in ("json", "csv", "parquet")):
        if isinstance(files, dict):
            split = spec.get("split") or "train"
            if split not in files:
                raise DataError(f"split '{split}' not in data_files ({', '.join(files)})", source=path)
            files = files[split]
        base = p if p.is_dir() else None
        if spec.get("data_dir"):
            base = (base or Path(".")) / spec["data_dir"]
        return [(str(f), read_file(f)) for f in _expand(files, base, path)]
    if p.is_file():
        return [(str(p), read_file(p))]
    if p.is_dir():
        if spec.get("data_dir"):
            p = p / spec["data_dir"]
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return [(str(p), _read_saved(p, spec.get("split")))]
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not found:
            raise DataError(f"directory has no {'/'.join(SUFFIXES)} files and is not a save_to_disk dataset",
                            source=str(p))
        return [(str(f), read_file(f)) for f in found]
    if Path(path).suffix.lower() in SUFFIXES or path.startswith(("/", ".", "~")) or \
            not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise DataError(f"file or directory not found: {path}", source=path)
    return [(path, _read_hub(spec))]
