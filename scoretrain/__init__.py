"""scoretrain: find the subnetworks hidden in randomly weighted networks (edge-popup)."""

__version__ = "0.2.0"


def __getattr__(name):
    """scoretrain.fit and scoretrain.open_run (api.py), imported on first use: `import scoretrain`
    stays light for the modules that read only the version."""
    if name in ("fit", "open_run", "open_ticket", "measure", "RunRecord"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'scoretrain' has no attribute {name!r}")
