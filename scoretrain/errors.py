"""The errors a user can cause. The CLI prints them as one line and exits with `exit_code`; the
faults a run meets (a full disk, no memory) are said in one line by `failure`."""

import errno
import os


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


def os_reason(e: OSError) -> str:
    """An OSError as a few words: 'the disk is full' rather than h5py's chain of HDF5 messages."""
    said = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only", errno.EDQUOT: "the disk quota is exceeded"}
    if e.errno in said:
        return f"{said[e.errno]} ({os.strerror(e.errno)})"
    return os.strerror(e.errno) if e.errno else (str(e).splitlines() or [type(e).__name__])[0]


def failure(e: BaseException) -> str:
    """What stopped a run, in one line, for run.h5's `message` and the command line."""
    if isinstance(e, MemoryError):
        return f"out of memory ({str(e).splitlines()[0] if str(e) else 'an allocation failed'})"
    if isinstance(e, OSError):
        return os_reason(e)
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{e.__class__.__name__}: {first}" if first else e.__class__.__name__
