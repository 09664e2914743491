"""User-facing errors: one clear message, non-zero exit, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input (config, data, paths); printed without a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A recipe or command-line key is missing, unknown or invalid."""


class DataError(UserError):
    """A dataset row or field is invalid. The message names the file, row and field."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None):
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        self.source, self.row, self.field, self.detail = source, row, field, message
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class ModelError(UserError):
    """A model or tokenizer could not be resolved or loaded."""
