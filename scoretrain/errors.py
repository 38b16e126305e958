"""The errors a user can cause. The CLI prints them as one line and exits with `exit_code`."""


class ScoretrainError(Exception):
    exit_code = 1


class ConfigError(ScoretrainError):
    """A bad experiment spec, override or command-line value."""

    exit_code = 2


class DataError(ScoretrainError):
    """Missing, truncated or corrupt dataset files."""


class RunError(ScoretrainError):
    """A run directory that cannot be created, read or resumed."""


class DeviceError(ScoretrainError):
    """A device that was asked for but is not there."""
