"""Errors the user can act on: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input, configuration or environment; the message names the file and the problem."""


class DataError(UserError):
    """A data file that cannot be used (missing columns, wrong shapes, non-finite values...)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or incompatible with the configuration."""
