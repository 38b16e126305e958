"""scoretrain: find the subnetworks hidden in randomly weighted networks (edge-popup)."""

__version__ = "0.2.0"
