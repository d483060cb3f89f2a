"""The errors that are the user's to fix (a config, a checkpoint, data, a full disk), as opposed to bugs:
the engine's commands report them in one line naming the file or key, and exit with status 2."""
from __future__ import annotations

from d2v2.config import ConfigError
from d2v2.data.common import CorruptDataError, MissingDataError
from d2v2.engine.checkpoint import CheckpointError

__all__ = ["USER_ERRORS", "EXIT_USER_ERROR"]

USER_ERRORS = (ConfigError, CheckpointError, MissingDataError, CorruptDataError)
EXIT_USER_ERROR = 2
