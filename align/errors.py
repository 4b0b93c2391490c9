"""The project's exception types.

Every error a user can cause is an `AlignError`; the CLI turns it into one line on stderr and
the exit code below. Anything else escaping a stage is a bug in align.
"""


class AlignError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 1


class ConfigError(AlignError):
    """An invalid recipe, config key, config value or command-line flag."""

    exit_code = 2


class DataError(AlignError):
    """A data file that is missing, malformed or in the wrong format."""

    exit_code = 3


class ModelError(AlignError):
    """A model that cannot be found, loaded or used for this stage."""

    exit_code = 4


class OutputError(AlignError):
    """An output location that cannot be used (exists, not writable, ...)."""

    exit_code = 5


class TrainingError(AlignError):
    """Training went wrong in a way the user must look at (NaN loss, ...)."""

    exit_code = 6
