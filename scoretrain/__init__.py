"""scoretrain: find the subnetworks hidden in randomly weighted networks (edge-popup)."""

__version__ = "0.2.0"

__all__ = ["fit", "resume", "open_run", "open_ticket", "measure", "RunRecord", "__version__"]


def __getattr__(name):
    """The Python API (api.py), imported on first use: `import scoretrain` stays light for the
    modules that read only the version."""
    if name in __all__ and name != "__version__":
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'scoretrain' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
