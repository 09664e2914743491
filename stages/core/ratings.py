"""Ratings and the text of values: the rating settings' checks, numbers and booleans read from text (a CSV cell
holds text: readers._read_csv), and the pairing of rated completions of one prompt into preference pairs.
Pure functions, no I/O; formats.py uses them to convert feedback rows."""
from __future__ import annotations

from typing import Any

from .errors import ConfigError

PAIRINGS = ("all", "extremes")
# what spreadsheets and R write in an empty cell: a missing margin or classification label
MISSING_WORDS = {"", "na", "n/a", "nan", "null", "none"}


def number(value: Any) -> float | None:
    """A number, or the text of one (a CSV cell); None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def boolean(value: Any) -> Any:
    """A boolean, or the text of one ("true"/"false" in any case: a CSV cell); anything else unchanged."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def check_rating_settings(rating_scale=None, rating_threshold=None, pairs: str = "all") -> None:
    """Raise ConfigError for a malformed ``rating_scale``/``rating_threshold``/``pairs``."""
    if rating_scale is not None:
        ok = isinstance(rating_scale, (list, tuple)) and len(rating_scale) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in rating_scale)
        if not ok or rating_scale[0] >= rating_scale[1]:
            raise ConfigError(f"rating_scale: expected [lowest, highest] with lowest < highest, got {rating_scale!r}")
    if rating_threshold is not None and (isinstance(rating_threshold, bool)
                                         or not isinstance(rating_threshold, (int, float))):
        raise ConfigError(f"rating_threshold: must be a number, got {rating_threshold!r}")
    if pairs not in PAIRINGS:
        raise ConfigError(f"pairs: must be one of {', '.join(PAIRINGS)}, got {pairs!r}{_suggest(pairs)}")


def _suggest(pairs) -> str:
    from .formats import suggest

    return suggest(pairs, PAIRINGS)


def pair_ratings(rows: list[tuple[int, dict]], pairs: str = "all") -> tuple[list[tuple[int, dict]], list[int]]:
    """Preference pairs from rated rows ``(index, {"prompt", "completion", "rating"|"label"})``.

    Rows sharing a prompt are paired: ``all`` pairs every two different ratings, ``extremes`` the
    best with the worst (the first of each in file order). Equal ratings never pair; the higher
    rating is chosen; a numeric rating's gap becomes ``margin``. Returns (chosen row's index, pair)
    and the indices of rows in no pair."""
    groups: dict[str, list[tuple[int, dict]]] = {}
    for index, row in rows:
        key = repr(row["prompt"])
        groups.setdefault(key, []).append((index, row))
    out, used = [], set()

    def value(row):
        return float(row["rating"]) if "rating" in row else float(row["label"])

    def pair(a, b):
        (ia, ra), (ib, rb) = (a, b) if value(a[1]) > value(b[1]) else (b, a)
        if ra["completion"] == rb["completion"]:
            return
        p = {"prompt": ra["prompt"], "chosen": ra["completion"], "rejected": rb["completion"]}
        if "rating" in ra:
            p["margin"] = value(ra) - value(rb)
        if ra.get("meta") is not None:
            p["meta"] = ra["meta"]
        out.append((ia, p))
        used.update((ia, ib))

    for group in groups.values():
        if pairs == "extremes":
            best = max(group, key=lambda ir: value(ir[1]))  # max/min keep the first of equals
            worst = min(group, key=lambda ir: value(ir[1]))
            if value(best[1]) != value(worst[1]):
                pair(best, worst)
            continue
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if value(a[1]) != value(b[1]):
                    pair(a, b)
    return out, [i for i, _ in rows if i not in used]
