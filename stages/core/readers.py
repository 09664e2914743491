"""Reading dataset sources: files (json, jsonl, csv, parquet), directories, save_to_disk folders,
Hub names and the built-in ``demo:NAME`` sets. Returns plain row dicts; conversion happens in data.py."""
from __future__ import annotations

import codecs
import glob
import importlib
import io
import json
import re
from pathlib import Path
from typing import Any

from .errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def _json_lines(text: str, label: str) -> list[dict]:
    # split on "\n" only: str.splitlines also breaks at U+2028/U+2029 and other characters that JSON
    # strings may hold unescaped
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
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


def _read_text(path: Path, label: str) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped); other bytes name their line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the file: {e.strerror or e}", source=label) from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"line {line}: byte 0x{data[e.start]:02x} (column {column}) is not UTF-8; save the file "
                        "as UTF-8", source=label) from None


def _read_csv(text: str, label: str) -> list[dict]:
    import pandas as pd

    if not text.strip():
        raise DataError("the file is empty (no header row, no rows)", source=label)
    try:
        # every cell is text, as written: pandas' own typing turned an answer "4" into an int and "None", "NA" or
        # "nan" into a missing value; the fields that are not text (label, rating, margin) convert their own
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError("the file is empty (no header row, no rows)", source=label) from None
    except pd.errors.ParserError as e:
        msg = str(e).replace("Error tokenizing data. C error: ", "")
        eof = re.search(r"EOF inside string starting at row (\d+)", msg)
        if eof:  # pandas counts the header as row 0: that is the file's line number minus one
            raise DataError(f"line {int(eof.group(1)) + 1}: a quoted field starting on this line is never closed "
                            "(unterminated quote)", source=label) from None
        raise DataError(f"not readable as CSV: {msg}", source=label) from None
    return [{k: None if v == "" else _decode_cell(v) for k, v in r.items()} for r in df.to_dict("records")]


def _read_parquet(path: Path, label: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.stat().st_size == 0:
            raise DataError("the file is empty (0 bytes)", source=label)
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        msg = str(e).replace(f"Could not open Parquet input source '{path}': ", "")
        raise DataError(f"not a readable Parquet file: {msg}", source=label) from None


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
    """Rows of one .json/.jsonl/.csv/.parquet file (CSV cells holding JSON objects/lists are decoded).

    A file that cannot be read (not UTF-8, an unterminated CSV quote, not Parquet) or that holds no
    rows raises one DataError naming the file (and the line, where there is one)."""
    label, suffix = str(path), path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        text = _read_text(path, label)
        if not text.strip():
            raise DataError("the file is empty (no rows)", source=label)
        rows = None
        if suffix == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                if text.lstrip()[:1] == "[":
                    raise DataError(f"malformed JSON on line {e.lineno}: {e.msg}", source=label) from None
                rows = None  # not one document: JSON lines
            if isinstance(rows, dict):
                rows = [rows]
            if rows is not None and (not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows)):
                raise DataError("expected a JSON array of objects (or JSON lines)", source=label)
        rows = _json_lines(text, label) if rows is None else rows
    elif suffix == ".csv":
        rows = _read_csv(_read_text(path, label), label)
    elif suffix == ".parquet":
        rows = _read_parquet(path, label)
    else:
        raise DataError(f"unsupported file type '{suffix}'; expected one of {', '.join(SUFFIXES)}", source=label)
    if not rows:
        raise DataError("the file holds no rows" + (" (only a header)" if suffix == ".csv" else ""), source=label)
    return rows


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
