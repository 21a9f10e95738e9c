"""User-facing errors: the CLI prints `mlxtune: error: <message>` and exits 2, no traceback.

Raise these (or subclasses) for anything a user can fix: bad config, bad data, a missing
model folder. The message is one line that names the place (file:line, config key, field).
"""

from __future__ import annotations


class MlxtuneError(Exception):
    """Something the user can fix; its message is the whole story."""

    exit_code = 2


class ConfigError(MlxtuneError, ValueError):
    """A config file, `--set` override or config value is wrong."""


class DataError(MlxtuneError, ValueError):
    """A data file or row is wrong: the message starts with `path:line:` and names the field."""


class ModelError(MlxtuneError):
    """A model folder, checkpoint or adapter is missing or does not fit."""
