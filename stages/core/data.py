"""Dataset loading: sources, mixtures, validation, dedupe, split, fingerprints and a report.

``load_data(sources, task=...)`` reads each source (file, directory, ``save_to_disk`` folder, Hub
name or ``demo:NAME``), converts every row to the task's canonical form (``formats.py``),
validates, removes exact duplicates, mixes (``fraction`` as TRL, ``weight`` to repeat or
subsample), splits off a validation set and returns ``datasets.Dataset`` objects with a report.

Error positions: ``row`` is the 0-based record index within its file (blank JSONL lines are not
counted); JSON syntax errors name the 1-based line. Order of operations per source: read
(``max_rows`` caps rows read) → convert/validate → dedupe (also across earlier sources) →
``fraction``; then the split (over unique rows) → ``weight`` (training rows only) → shuffle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import formats as F
from .errors import ConfigError, DataError
from .ratings import check_rating_settings, pair_ratings
from .readers import SUFFIXES, read_file, read_source  # noqa: F401  (re-exported)

SOURCE_KEYS = ("path", "name", "data_dir", "data_files", "split", "columns", "fraction",
               "weight", "format", "column_mapping", "role_mapping", "max_rows", "rating_scale",
               "rating_threshold", "pairs")
MAX_EXAMPLES = 5  # dropped-row examples kept in the report


@dataclass
class SourceReport:
    """What happened to one source's rows."""

    source: str
    format: str = ""
    files: list[str] = field(default_factory=list)
    weight: float = 1.0
    fraction: float | None = None
    rows_read: int = 0
    rows_kept: int = 0  # canonical rows after validation, dedupe and fraction
    rows_train: int = 0  # after the split and weight
    rows_eval: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    duplicates_removed: int = 0
    fingerprint: str = ""


@dataclass
class DataReport:
    """Counts and fingerprints for the manifest."""

    task: str
    on_invalid: str
    sources: list[SourceReport]
    eval_sources: list[SourceReport] = field(default_factory=list)
    split: dict = field(default_factory=dict)
    train_size: int = 0
    eval_size: int = 0
    eval_overlap_removed: int = 0  # training rows identical to an eval_sources row
    train_fingerprint: str = ""
    eval_fingerprint: str | None = None
    dropped_examples: list[dict] = field(default_factory=list)
    meta_encoding: str | None = None  # "native", or "json" when meta values don't fit one arrow type

    def totals(self) -> dict:
        srcs = self.sources + self.eval_sources
        return {"rows_read": sum(s.rows_read for s in srcs), "rows_kept": sum(s.rows_kept for s in srcs),
                "dropped": sum(sum(s.dropped_by_reason.values()) for s in srcs),
                "duplicates_removed": sum(s.duplicates_removed for s in srcs)}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["totals"] = self.totals()
        d["fingerprints"] = {"train": self.train_fingerprint, "eval": self.eval_fingerprint,
                             "sources": [s.fingerprint for s in self.sources],
                             "eval_sources": [s.fingerprint for s in self.eval_sources]}
        return d

    def summary(self) -> str:
        lines = [f"data ({self.task}): {self.train_size} train / {self.eval_size} eval rows; split: "
                 f"{self.split.get('rule')}"]
        for s in self.sources + self.eval_sources:
            dropped = ", ".join(f"{k}={v}" for k, v in sorted(s.dropped_by_reason.items())) or "none"
            lines.append(f"  {s.source} [{s.format}]: read {s.rows_read}, kept {s.rows_kept}, dropped {dropped}, "
                         f"duplicates {s.duplicates_removed}, weight {s.weight:g}, fp {s.fingerprint[:12]}")
        for ex in self.dropped_examples:
            lines.append(f"  dropped: {ex['message']}")
        if self.eval_overlap_removed:
            lines.append(f"  removed {self.eval_overlap_removed} training rows identical to eval rows")
        return "\n".join(lines)


@dataclass
class LoadedData:
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset | None
    report: DataReport
    origins: dict = field(default_factory=dict)  # split -> [(file, row in the file)] in the split's order

    def locate(self, error: DataError, split: str) -> DataError:
        """`error` about row N of a split (shuffled, deduplicated) restated at the file and row it came from."""
        found = self.origins.get(split) or []
        if error.row is None or not 0 <= error.row < len(found):
            return error
        source, row = found[error.row]
        return DataError(f"{error.detail} ({'training' if split == 'train' else 'validation'} row {error.row})",
                         source=source, row=row, field=error.field)


# ---------------------------------------------------------------- reading


def row_key(row: dict) -> str:
    """Canonical JSON of a row (the identity used for dedupe and fingerprints)."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def fingerprint(keys) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()

# ---------------------------------------------------------------- converting


def normalize_source(src: Any, index: int) -> dict:
    """A source as a dict with known keys (strings are {"path": s}; TRL DatasetConfig accepted)."""
    if isinstance(src, (str, Path)):
        src = {"path": str(src)}
    elif dataclasses.is_dataclass(src):
        src = {k: v for k, v in dataclasses.asdict(src).items() if v is not None}
    if not isinstance(src, dict):
        raise ConfigError(f"datasets[{index}]: expected a path or a mapping, got {type(src).__name__}")
    for key in src:
        if key not in SOURCE_KEYS:
            raise ConfigError(f"datasets[{index}]: unknown key '{key}'{F.suggest(key, SOURCE_KEYS)}; "
                              f"valid keys: {', '.join(SOURCE_KEYS)}")
    if not src.get("path"):
        raise ConfigError(f"datasets[{index}]: 'path' is required")
    weight = src.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
        raise ConfigError(f"datasets[{index}]: weight must be a number > 0, got {weight!r}")
    fraction = src.get("fraction")
    if fraction is not None and (not isinstance(fraction, (int, float)) or fraction < 0):
        raise ConfigError(f"datasets[{index}]: fraction must be a number >= 0, got {fraction!r}")
    return dict(src, path=str(src["path"]))


class _Loader:
    """Reads, converts, validates and dedupes sources; shares one `seen` set per role."""

    def __init__(self, task, on_invalid, data_format, column_mapping, role_mapping, max_rows, ratings):
        self.task, self.on_invalid, self.data_format = task, on_invalid, data_format
        self.column_mapping, self.role_mapping, self.max_rows = column_mapping, role_mapping, max_rows
        self.ratings = ratings  # rating_scale, rating_threshold, pairs
        self.examples: list[dict] = []
        self.by_prompt: set[int] = set()  # ids of sources whose pairs were made per prompt (split by prompt)
        self.origins: dict[int, dict[str, tuple[str, int]]] = {}  # per `seen` set: row key -> (file, row) first seen

    def _drop(self, rep: SourceReport, e: F.RowError) -> None:
        rep.dropped_by_reason[e.reason] = rep.dropped_by_reason.get(e.reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"source": e.source, "row": e.row, "field": e.field, "reason": e.reason,
                                  "message": str(e)})

    def load(self, spec: dict, seen: set) -> tuple[SourceReport, list[tuple[str, dict]]]:
        rep = SourceReport(source=spec["path"] + (f" [{spec['split']}]" if spec.get("split") else ""),
                           weight=float(spec.get("weight", 1.0)), fraction=spec.get("fraction"))
        cm = spec.get("column_mapping", self.column_mapping)
        rm = spec.get("role_mapping", self.role_mapping)
        F.check_mappings(cm, rm)
        budget = spec.get("max_rows", self.max_rows)
        ratings = {k: spec.get(k, v) for k, v in self.ratings.items()}
        check_rating_settings(**ratings)
        pairs = ratings.pop("pairs")
        converted, rated, fmts = [], [], []
        for label, rows in read_source(spec):
            if budget is not None:
                rows, budget = rows[:max(budget, 0)], max(budget - len(rows), 0)
            rep.files.append(label)
            rep.rows_read += len(rows)
            if not rows:
                continue
            rows = self._select(rows, spec.get("columns"), label)
            fmt = self._format(spec, rows, cm, label)
            fmts.append(fmt)
            pairing = self.task == "preference" and F.kind(fmt) == "feedback"
            for i, row in enumerate(rows):
                try:
                    canon = F.convert_row(row, task=self.task, fmt=fmt, column_mapping=cm, role_mapping=rm,
                                          source=label, index=i, **ratings)
                except F.RowError as e:
                    if self.on_invalid == "error":
                        raise
                    self._drop(rep, e)
                    continue
                if pairing:
                    rated += [((label, i), c) for c in canon]
                else:
                    converted += [((label, i), c) for c in canon]
        if rated:  # ratings/labels become pairs per prompt, over all of this source's files
            made, alone = pair_ratings(rated, pairs)
            converted += made  # each pair comes from its chosen row
            if alone:
                rep.dropped_by_reason["no_rating_partner"] = len(alone)
            self.by_prompt.add(id(rep))
        out = []
        for origin, c in converted:
            key = row_key(c)
            if key in seen:
                rep.duplicates_removed += 1
            else:
                seen.add(key)
                self.origins.setdefault(id(seen), {}).setdefault(key, origin)
                out.append((key, c))
        rep.format = ",".join(dict.fromkeys(fmts))
        rep.rows_kept = len(out)
        return rep, out

    @staticmethod
    def _select(rows, columns, label):
        if not columns:
            return rows
        present = set().union(*(r.keys() for r in rows[:100]))
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"columns {missing} (from 'columns') not found; columns seen: {sorted(present)}",
                            source=label)
        return [{c: r.get(c) for c in columns} for r in rows]

    def _format(self, spec, rows, cm, label) -> str:
        fmt = spec.get("format") or self.data_format
        cols = sorted({k for r in rows[:100] for k, v in r.items() if v is not None})
        present = {k for r in rows[:100] for k in r}
        for canon, col in (cm or {}).items():
            if canon not in ("role", "content") and col not in present:
                hint = f" (did you mean {{'{col}': '{canon}'}}? keys are canonical fields)" if canon in cols else ""
                raise DataError(f"column_mapping maps '{canon}' to column '{col}', which is not in the data; "
                                f"columns seen: {cols}{hint}", source=label)
        if fmt == "auto":
            mapped = F.map_columns(dict.fromkeys(cols), cm)
            sample = next((r for r in rows if F.map_columns(r, cm).get("chosen") is not None), rows[0])
            fmt = F.detect_format(cols, sample if "chosen" in mapped else None, column_mapping=cm, source=label,
                                  task=self.task)
        F.check_task(fmt, self.task, source=label)
        return fmt


# ---------------------------------------------------------------- mixing, splitting


def _apply_fractions(parts: list, reports: list[SourceReport]) -> None:
    """TRL semantics: shares normalised to one; mixture capped so no source is oversampled."""
    fractions = [r.fraction for r in reports]
    if all(f is None for f in fractions):
        return
    if any(f is None for f in fractions) or sum(fractions) <= 0:
        raise ConfigError("fraction must be set for either all datasets in the mixture or none, with a positive sum")
    shares = [f / sum(fractions) for f in fractions]
    total = min(len(p) / s for p, s in zip(parts, shares) if s > 0)
    for i, (p, s, r) in enumerate(zip(parts, shares, reports)):
        parts[i] = p[:round(s * total)]
        r.rows_kept = len(parts[i])


def _rank(seed: int, key: str, salt: str = "") -> str:
    return hashlib.sha256(f"{seed}:{salt}:{key}".encode("utf-8")).hexdigest()


def _split_key(by_prompt: bool, key: str, row: dict) -> str:
    """Rows that must stay on one side of the split share a key. KTO rows unpaired from one preference
    pair (and any rows sharing a prompt), and pairs made from ratings of one prompt, are grouped by
    prompt, else validation would score completions to prompts seen in training."""
    return row_key({"prompt": row["prompt"]}) if by_prompt else key


def _weighted(rows: list, weight: float, seed: int) -> list:
    """Whole copies for the integer part; a seeded, content-hashed subset for the rest."""
    target = round(weight * len(rows))
    copies, rest = divmod(target, len(rows)) if rows else (0, 0)
    out = [(k, c, n) for n in range(copies) for k, c in rows]
    chosen = sorted(rows, key=lambda kc: _rank(seed, kc[0], "weight"))[:rest]
    return out + [(k, c, copies) for k, c in chosen]


def _dataset(rows: list[dict], report: DataReport):
    import datasets

    optional = [c for c in ("margin", "meta") if any(c in r for r in rows)]
    rows = [dict(r, **{c: r.get(c) for c in optional}) for r in rows]
    if "meta" in optional:
        try:
            ds = datasets.Dataset.from_list(rows)
            ok = list(ds["meta"]) == [r["meta"] for r in rows]
        except Exception:  # mixed types arrow can't hold in one column
            ok = False
        if ok:
            report.meta_encoding = report.meta_encoding or "native"
            return ds
        report.meta_encoding = "json"
        rows = [dict(r, meta=None if r["meta"] is None else json.dumps(r["meta"], ensure_ascii=False))
                for r in rows]
    return datasets.Dataset.from_list(rows)


def load_data(sources, *, task, eval_sources=None, validation_fraction=0.1, validation_size=None, seed=42,
              on_invalid="error", data_format="auto", column_mapping=None, role_mapping=None,
              max_rows=None, rating_scale=None, rating_threshold=None, pairs="all") -> LoadedData:
    """Load, validate, dedupe, mix and split ``sources`` into canonical rows for ``task``.

    ``max_rows`` is the default per-source cap on rows read. Without ``eval_sources``, the
    ``validation_size`` (or ``round(validation_fraction * unique rows)``, at least 1) unique rows
    with the smallest ``sha256(seed, row)`` are held out: the split depends on row content and
    seed, not on file order. For ``unpaired`` (KTO) whole prompts are held out, so no prompt is on
    both sides (with ``eval_sources``, training rows with an eval prompt are removed). Weights apply
    to training rows only; the training set is shuffled deterministically (seeded), the eval set is
    in hash order.

    Feedback rows (a label or a rating on a conversation's last assistant turn): ``rating_threshold``
    (default: the middle of ``rating_scale``, else 0.5 of [0, 1]) makes labels for ``unpaired``;
    for ``preference`` ``pairs`` (all | extremes) pairs ratings per prompt (ratings.pair_ratings),
    rows in no pair are counted as ``no_rating_partner``, and such pairs are split by prompt."""
    if task not in F.TASKS:
        raise ConfigError(f"unknown task '{task}'{F.suggest(task, F.TASKS)}; expected one of {', '.join(F.TASKS)}")
    if on_invalid not in ("error", "drop"):
        raise ConfigError(f"on_invalid must be 'error' or 'drop', got {on_invalid!r}")
    if data_format != "auto" and data_format not in F.FORMATS:
        raise ConfigError(f"unknown data format '{data_format}'{F.suggest(data_format, F.FORMATS)}; "
                          f"expected 'auto' or one of {', '.join(F.FORMATS)}")
    if not 0 <= validation_fraction < 1:
        raise ConfigError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if validation_size is not None and (not isinstance(validation_size, int) or validation_size < 0):
        raise ConfigError(f"validation_size must be a non-negative integer, got {validation_size!r}")
    if isinstance(sources, (str, dict, Path)):
        sources = [sources]
    if not sources:
        raise ConfigError("no datasets given")
    specs = [normalize_source(s, i) for i, s in enumerate(sources)]
    eval_specs = [normalize_source(s, i) for i, s in enumerate(eval_sources or [])]
    loader = _Loader(task, on_invalid, data_format, column_mapping, role_mapping, max_rows,
                     {"rating_scale": rating_scale, "rating_threshold": rating_threshold, "pairs": pairs})
    report = DataReport(task=task, on_invalid=on_invalid, sources=[])

    seen: set = set()
    parts = []
    for spec in specs:
        rep, rows = loader.load(spec, seen)
        report.sources.append(rep)
        parts.append(rows)
    _apply_fractions(parts, report.sources)
    for rep, rows in zip(report.sources, parts):
        rep.fingerprint = fingerprint(k for k, _ in rows)
    by_prompt = [task == "unpaired" or id(rep) in loader.by_prompt for rep in report.sources]

    eval_rows: list = []
    eval_seen: set = set()
    if eval_specs:
        eparts = []
        for spec in eval_specs:
            rep, rows = loader.load(spec, eval_seen)
            report.eval_sources.append(rep)
            eparts.append(rows)
        _apply_fractions(eparts, report.eval_sources)
        for rep, rows in zip(report.eval_sources, eparts):
            rep.fingerprint, rep.rows_eval = fingerprint(k for k, _ in rows), len(rows)
            eval_rows += rows
        keys = {k for k, _ in eval_rows}
        if any(by_prompt):
            keys |= {_split_key(True, *kc) for kc in eval_rows}
        before = sum(map(len, parts))
        parts = [[kc for kc in p if _split_key(bp, *kc) not in keys and kc[0] not in keys]
                 for p, bp in zip(parts, by_prompt)]
        report.eval_overlap_removed = before - sum(map(len, parts))
        report.split = {"rule": f"eval_sources ({len(eval_specs)})", "seed": seed}
    else:
        n = sum(map(len, parts))
        k = validation_size if validation_size is not None else (
            min(max(1, round(validation_fraction * n)), n - 1) if validation_fraction > 0 and n > 1 else 0)
        if k and k >= n:
            raise DataError(f"validation split of {k} rows leaves no training rows ({n} unique rows)")
        def group(kc, bp: bool) -> str:
            return _rank(seed, _split_key(bp, *kc))

        sizes: dict[str, int] = {}
        for p, bp in zip(parts, by_prompt):
            for kc in p:
                sizes[group(kc, bp)] = sizes.get(group(kc, bp), 0) + 1
        held: set = set()
        n_held = 0
        for g in sorted(sizes):  # whole groups in hash order until k rows; one group always trains
            if n_held >= k or len(held) == len(sizes) - 1:
                break
            held.add(g)
            n_held += sizes[g]
        for i, (rep, p) in enumerate(zip(report.sources, parts)):
            ev = [kc for kc in p if group(kc, by_prompt[i]) in held]
            rep.rows_eval = len(ev)
            eval_rows += ev
            parts[i] = [kc for kc in p if group(kc, by_prompt[i]) not in held]
        by = f", whole prompts ({len(held)})" if any(by_prompt) else ""
        report.split = {"rule": f"hash(seed={seed}): {n_held} of {n} unique rows held out{by}" if n_held else "none",
                        "seed": seed, "validation_fraction": validation_fraction, "validation_size": validation_size}
    report.dropped_examples = loader.examples

    train = []
    for rep, p in zip(report.sources, parts):
        w = _weighted(p, rep.weight, seed)
        rep.rows_train = len(w)
        train += w
    train.sort(key=lambda t: _rank(seed, t[0], f"shuffle{t[2]}"))
    eval_rows.sort(key=lambda kc: _rank(seed, kc[0]))
    if not train:
        src = report.sources
        alone = sum(s.dropped_by_reason.get("no_rating_partner", 0) for s in src)
        raise DataError(f"no training rows left: {sum(s.rows_read for s in src)} read, "
                        f"{sum(sum(s.dropped_by_reason.values()) for s in src) - alone} invalid, "
                        f"{sum(s.duplicates_removed for s in src)} duplicates, "
                        f"{report.eval_overlap_removed} identical to eval rows"
                        + (f", {alone} ratings with no other rating of their prompt to pair with" if alone else "")
                        + "".join(f"; e.g. {e['message']}" for e in report.dropped_examples[:2]))
    report.train_size, report.eval_size = len(train), len(eval_rows)
    report.train_fingerprint = fingerprint(k for k, _, _ in train)
    report.eval_fingerprint = fingerprint(k for k, _ in eval_rows) if eval_rows else None
    train_ds = _dataset([c for _, c, _ in train], report)
    eval_ds = _dataset([c for _, c in eval_rows], report) if eval_rows else None
    train_origin = loader.origins.get(id(seen), {})
    eval_origin = {**train_origin, **loader.origins.get(id(eval_seen), {})}  # held-out rows, or the eval files' own
    origins = {"train": [train_origin[k] for k, _, _ in train], "eval": [eval_origin[k] for k, _ in eval_rows]}
    return LoadedData(train=train_ds, eval=eval_ds, report=report, origins=origins)
