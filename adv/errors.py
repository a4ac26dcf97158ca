"""User-facing errors.

Every problem a user can fix (a bad argument, a missing file, an offline
download, a bad config) raises ``AdvError`` or one of its subclasses. The CLI
and the job entrypoints turn these into one-line messages instead of
tracebacks.
"""


class AdvError(Exception):
    """A problem the user can fix; its message says how."""


class DataNotFoundError(AdvError, FileNotFoundError):
    """A dataset could not be found locally and could not be downloaded."""


class CheckpointError(AdvError):
    """A checkpoint or external weight file is missing or does not match."""


class ConfigError(AdvError, ValueError):
    """A configuration value is invalid; the message names the key."""


class InputError(AdvError, ValueError):
    """A model, data or budget handed to an evaluation that it cannot use as given; the message names the fix."""
