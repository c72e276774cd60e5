"""Errors a user can fix (bad config, missing file, bad data).

The entry points print these as one short message and exit non-zero, without a
traceback; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Base class of every error caused by the user's input rather than by our code."""


class ConfigError(UserError):
    """A config key, value or name is wrong."""


class DataError(UserError):
    """A data file, record or image is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model."""
