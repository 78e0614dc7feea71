"""Errors caused by what a user gave (a path, a config value, a file), not by a bug: the
``sslzoo`` command prints their message alone, without a traceback."""

from __future__ import annotations

import sys

from lightning.fabric.utilities.rank_zero import rank_zero_only


class UserError(Exception):
    """The input is wrong, not the code; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work (the message names the key)."""


class DataError(UserError, ValueError):
    """Data that cannot be trained or evaluated on as given (the message names the files)."""


class MissingDataError(UserError, FileNotFoundError):
    """A file or folder that is not there (the message names the path and how to get it)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: unreadable, not written by sslzoo, or unsafe."""


@rank_zero_only
def warn_user(message: str) -> None:
    """Print ``warning: message`` on the first process only (not Python's warning format with
    a source line: this is about the user's input, not the code)."""
    sys.stderr.write(f"warning: {message}\n")
