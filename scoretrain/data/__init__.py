"""Datasets: where their files are, download and verification, parsing, and the preparation a run
applies (validation split, standardization, augmentation)."""
