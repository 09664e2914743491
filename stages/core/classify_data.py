"""Classification data: rows of text (or chat `messages`) with a label (single-label) or labels (multi-label).

Columns: `text` + `label`, or `text` + `labels` (a list, multi-label), or `messages` instead of `text`;
other names through `column_mapping` (canonical field -> your column, e.g. {text: review, label: stars}).
Labels are names or integer ids into the taxonomy. The taxonomy (label order = ids) is the recipe's
`labels:` list (or a file, one name a line / a JSON or YAML list), else the sorted names seen in the data.
Sources are read by readers.py (files, directories, Hub names, `demo:NAME`); exact duplicates are removed
and, without `eval_datasets`, a validation split is held out by a seeded hash of each row's content (the same
rule as data.py). Errors name the file, row and field; the report (counts, imbalance, fingerprints) goes
into the manifest.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DataReport, LoadedData, SourceReport, _dataset, _rank, fingerprint, normalize_source, row_key
from .errors import ConfigError, DataError
from .ratings import MISSING_WORDS
from .readers import read_source

FIELDS = ("text", "messages", "label", "labels")
IMBALANCE_WARN = 5.0  # largest / smallest class count above which the report warns


@dataclass
class Taxonomy:
    labels: list[str]
    source: str  # "recipe", a file path, or "inferred"

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.labels)}


def read_taxonomy(value) -> Taxonomy | None:
    """The recipe's `labels:` (a list of names, or a path to a file holding them)."""
    if value is None or value == []:
        return None
    source = "recipe"
    if isinstance(value, str) and not value.strip().startswith("["):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"labels: {value} is not a file (give a list of label names or a file of them)")
        text, source = path.read_text(encoding="utf-8"), str(path)
        if path.suffix in (".json", ".yaml", ".yml"):
            import yaml

            value = yaml.safe_load(text)
        else:
            value = [line.strip() for line in text.splitlines() if line.strip()]
    elif isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                            for v in value):
        raise ConfigError(f"labels: expected a non-empty list of label names, got {value!r}")
    names = [str(v) for v in value]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"labels: {', '.join(dupes)} listed more than once")
    if len(names) < 2:
        raise ConfigError("labels: a classifier needs at least two labels")
    return Taxonomy(names, source)


def closest(name: str, labels: list[str]) -> str:
    close = difflib.get_close_matches(str(name), labels, n=1, cutoff=0.0)
    return f" (closest valid label: '{close[0]}')" if close else ""


def _map(row: dict, mapping: dict | None) -> dict:
    if not mapping:
        return row
    out = {k: v for k, v in row.items() if k not in mapping.values()}
    out.update({canon: row[col] for canon, col in mapping.items() if col in row})
    return out


def render_input(row: dict, tokenizer=None) -> str:
    """The text a row is classified by: `text`, or its `messages` rendered with the chat template."""
    if row.get("text"):
        return row["text"]
    messages = json.loads(row["messages"]) if isinstance(row["messages"], str) else row["messages"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _raw_row(row: dict, mapping, multi_label: bool, where: dict, *, csv: bool = False) -> dict:
    """One raw row -> {"text", "messages", "raw"} with the problems named by file/row/field."""
    row = _map(row, mapping)
    text, messages = row.get("text"), row.get("messages")
    if text is None and messages is None:
        raise DataError("no 'text' (or 'messages') field; map your column with column_mapping: {text: COLUMN}", **where,
                        field="text")
    if text is not None:
        if not isinstance(text, str):
            raise DataError(f"text must be a string, got {type(text).__name__}", **where, field="text")
        if not text.strip():
            raise DataError("text is empty", **where, field="text")
        messages = ""
    else:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
            raise DataError("messages must be a non-empty list of {role, content} objects", **where, field="messages")
        if not any(m["content"].strip() for m in messages):
            raise DataError("every message is empty", **where, field="messages")
        messages, text = json.dumps(messages, ensure_ascii=False), ""
    key = "labels" if "labels" in row and row["labels"] is not None else "label"
    raw = _csv_label(row.get(key)) if csv else row.get(key)
    if raw is None:
        raise DataError(f"label missing (expected '{'labels' if multi_label else 'label'}'; map your column with "
                        "column_mapping: {label: COLUMN})", **where, field="labels" if multi_label else "label")
    if isinstance(raw, str) and raw.strip().startswith("["):
        try:
            raw = json.loads(raw)  # a CSV cell holding a list
        except ValueError:
            pass
    values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"label {v!r} is not a label name or an integer id", **where, field=key)
    if not multi_label and len(values) != 1:
        raise DataError(f"{len(values)} labels in a single-label task (set multi_label: true for rows with "
                        "several labels)", **where, field=key)
    return {"text": text, "messages": messages, "raw": values, "field": key}


def _resolve(values: list, taxonomy: Taxonomy, where: dict, field_name: str) -> list[int]:
    ids = []
    for v in values:
        if isinstance(v, int):
            if not 0 <= v < len(taxonomy.labels):
                raise DataError(f"label id {v} is out of range: the taxonomy has {len(taxonomy.labels)} labels "
                                f"(ids 0-{len(taxonomy.labels) - 1})", **where, field=field_name)
            ids.append(v)
        elif v in taxonomy.label2id:
            ids.append(taxonomy.label2id[v])
        else:
            raise DataError(f"unknown label '{v}'{closest(v, taxonomy.labels)}; labels ({taxonomy.source}): "
                            f"{', '.join(taxonomy.labels)}", **where, field=field_name)
    return sorted(set(ids))


def _csv_label(value):
    """A CSV label cell as JSON would hold it (readers._read_csv keeps every cell as text): digits are an id, a
    missing-value word is missing. JSON, Parquet and Hub labels written as text stay names."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in MISSING_WORDS:
        return None
    return value


def _infer(rows: list[tuple[dict, dict]]) -> Taxonomy:
    names = {v for _, r in rows for v in r["raw"] if isinstance(v, str)}
    ints = {v for _, r in rows for v in r["raw"] if isinstance(v, int)}
    if names and ints:
        where, r = next((w, r) for w, r in rows if any(isinstance(v, int) for v in r["raw"]))
        raise DataError("labels mix names and integer ids, and no taxonomy was given: set labels: [names in id "
                        "order] in the recipe", **where, field=r["field"])
    if ints:
        if min(ints) < 0:
            where, r = next((w, r) for w, r in rows if any(isinstance(v, int) and v < 0 for v in r["raw"]))
            raise DataError("negative label id", **where, field=r["field"])
        return Taxonomy([str(i) for i in range(max(ints) + 1)], "inferred")
    if len(names) < 2:
        raise DataError(f"only {len(names)} distinct label(s) in the data ({', '.join(map(str, names))}); a "
                        "classifier needs at least two")
    return Taxonomy(sorted(names), "inferred")


@dataclass
class ClassifyReport(DataReport):
    """DataReport plus the taxonomy, per-class counts, imbalance and warnings."""

    labels: list[str] = field(default_factory=list)
    taxonomy_source: str = ""
    multi_label: bool = False
    class_counts: dict = field(default_factory=dict)  # split -> {label: rows}
    imbalance_ratio: float | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [super().summary(), f"  labels ({self.taxonomy_source}, {'multi' if self.multi_label else 'single'}"
                                    f"-label): {', '.join(self.labels)}"]
        for split, counts in self.class_counts.items():
            lines.append(f"  {split} rows per label: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if self.imbalance_ratio is not None:
            lines.append(f"  class imbalance: largest/smallest training class = {self.imbalance_ratio:.1f}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def load_classification(sources, *, eval_sources=None, taxonomy: Taxonomy | None = None, multi_label: bool = False,
                        column_mapping=None, validation_fraction=0.1, validation_size=None, seed=42,
                        max_train_rows=None, max_eval_rows=None) -> LoadedData:
    """Read, validate, dedupe and split classification rows; rows become {text, messages, labels: [ids]}."""
    if column_mapping is not None:
        if isinstance(column_mapping, str):
            column_mapping = json.loads(column_mapping)
        for k in column_mapping:
            if k not in FIELDS:
                raise ConfigError(f"column_mapping: '{k}' is not a classification field{_hint(k)}; keys are "
                                  f"{', '.join(FIELDS)}, values your column names")
    specs = [normalize_source(s, i) for i, s in enumerate(sources or [])]
    if not specs:
        raise ConfigError("datasets: required (files, Hub names or 'demo:NAME')")
    eval_specs = [normalize_source(s, i) for i, s in enumerate(eval_sources or [])]

    def read(spec_list):
        out, reports = [], []
        for spec in spec_list:
            rep = SourceReport(source=spec["path"], format="classification")
            mapping = spec.get("column_mapping", column_mapping)
            for label, rows in read_source(spec):
                rep.files.append(label)
                if spec.get("max_rows") is not None:
                    rows = rows[:spec["max_rows"]]
                rep.rows_read += len(rows)
                csv = str(label).lower().endswith(".csv")
                for i, row in enumerate(rows):
                    where = {"source": label, "row": i}
                    raw = _raw_row(row, mapping, multi_label, where, csv=csv)
                    out.append((where, raw, rep))
            reports.append(rep)
        return out, reports

    train_raw, train_reports = read(specs)
    eval_raw, eval_reports = read(eval_specs)
    if taxonomy is None:
        taxonomy = _infer([(w, r) for w, r, _ in train_raw + eval_raw])

    def canon(items):
        seen, out = set(), []
        for where, r, rep in items:
            c = {"text": r["text"], "messages": r["messages"], "labels": _resolve(r["raw"], taxonomy, where, r["field"])}
            key = row_key(c)
            if key in seen:
                rep.duplicates_removed += 1
                continue
            seen.add(key)
            rep.rows_kept += 1
            keys.setdefault(id(rep), []).append(key)
            out.append((key, c))
        return out

    keys: dict[int, list[str]] = {}

    train, held = canon(train_raw), canon(eval_raw)
    for rep in train_reports + eval_reports:
        rep.fingerprint = fingerprint(keys.get(id(rep), []))
    report = ClassifyReport(task="classification", on_invalid="error", sources=train_reports,
                            eval_sources=eval_reports, labels=list(taxonomy.labels), taxonomy_source=taxonomy.source,
                            multi_label=multi_label)
    if eval_specs:
        keys = {k for k, _ in held}
        before = len(train)
        train = [kc for kc in train if kc[0] not in keys]
        report.eval_overlap_removed = before - len(train)
        report.split = {"rule": f"eval_sources ({len(eval_specs)})", "seed": seed}
    elif validation_fraction or validation_size:
        n = len(train)
        k = validation_size if validation_size is not None else min(max(1, round(validation_fraction * n)), n - 1)
        if k >= n:
            raise DataError(f"validation split of {k} rows leaves no training rows ({n} unique rows)")
        ranked = sorted(train, key=lambda kc: _rank(seed, kc[0]))
        held, train = ranked[:k], ranked[k:]
        report.split = {"rule": f"hash(seed={seed}): {k} of {n} unique rows held out", "seed": seed,
                        "validation_fraction": validation_fraction, "validation_size": validation_size}
    else:
        report.split = {"rule": "none"}
    if not train:
        raise DataError("no training rows left after removing duplicates and rows identical to validation rows")
    train.sort(key=lambda kc: _rank(seed, kc[0], "shuffle"))
    held.sort(key=lambda kc: _rank(seed, kc[0]))
    if max_train_rows is not None:
        train = train[:max_train_rows]
    if max_eval_rows is not None:
        held = held[:max_eval_rows]
    for rep in train_reports:
        rep.rows_train = rep.rows_kept
    report.train_size, report.eval_size = len(train), len(held)
    report.train_fingerprint = fingerprint(k for k, _ in train)
    report.eval_fingerprint = fingerprint(k for k, _ in held) if held else None
    _count_classes(report, taxonomy, [c for _, c in train], [c for _, c in held])
    return LoadedData(train=_dataset([c for _, c in train], report),
                      eval=_dataset([c for _, c in held], report) if held else None, report=report)


def _hint(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _count_classes(report: ClassifyReport, taxonomy: Taxonomy, train: list[dict], held: list[dict]) -> None:
    for split, rows in (("train", train), ("validation", held)):
        counts = dict.fromkeys(taxonomy.labels, 0)
        for r in rows:
            for i in r["labels"]:
                counts[taxonomy.labels[i]] += 1
        if rows:
            report.class_counts[split] = counts
    tr = report.class_counts["train"]
    present = [v for v in tr.values() if v]
    report.imbalance_ratio = round(max(present) / min(present), 2) if present else None
    if report.imbalance_ratio and report.imbalance_ratio >= IMBALANCE_WARN:
        report.warnings.append(f"classes are imbalanced (largest/smallest = {report.imbalance_ratio:.1f}); "
                               "consider class_weights: balanced")
    val = report.class_counts.get("validation", {})
    unseen = {k: v for k, v in val.items() if v and not tr[k]}
    if unseen:
        report.warnings.append("labels in validation but absent from training (the model cannot learn them): "
                               + ", ".join(f"{k} ({v} validation rows, 0 training rows)" for k, v in unseen.items()))
    never = [k for k, v in tr.items() if not v and not val.get(k)]
    if never:
        report.warnings.append(f"labels with no rows in any split: {', '.join(never)}")


def class_weights(report: ClassifyReport, multi_label: bool, train_size: int) -> list[float]:
    """`balanced` weights (scikit-learn's rule n / (k * count)); multi-label: positive weights negatives / positives."""
    counts = [report.class_counts["train"][n] for n in report.labels]
    if multi_label:
        return [((train_size - c) / c) if c else 1.0 for c in counts]
    k = sum(1 for c in counts if c)
    return [train_size / (k * c) if c else 0.0 for c in counts]


def read_input_rows(path: str, mapping: dict | None = None) -> list[dict]:
    """Rows to predict: `text` or `messages` (labels ignored); errors name the file, row and field."""
    from .readers import read_file

    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {path}", source=path)
    out = []
    for i, row in enumerate(read_file(p)):
        r = _map(row, mapping)
        where = {"source": str(p), "row": i}
        if isinstance(r.get("text"), str):
            if not r["text"].strip():
                raise DataError("text is empty", **where, field="text")
        elif not isinstance(r.get("messages"), list):
            raise DataError("no 'text' string (or 'messages' list)", **where, field="text")
        out.append({"text": r.get("text") or "", "messages": r.get("messages") or ""})
    return out


def example_row(labels: list[str], multi_label: bool) -> dict[str, Any]:
    return {"text": "...", "labels" if multi_label else "label": [labels[0]] if multi_label else labels[0]}
