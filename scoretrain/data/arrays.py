"""A user's arrays as a dataset: one .npz or HDF5 file (data.path) holding x_train, y_train,
x_test, y_test, and optionally x_val, y_val and class names (data.keys maps other key names).

Images are [N, H, W] or [N, H, W, C], uint8 (pixels 0..255, scaled to [0, 1] as the built-in
datasets are) or float (used as they are). Labels are any integers or strings: their sorted
values become the classes 0..C-1, the values (or the file's `classes` array) their names. Each
array is read once, straight into its NumPy array: an HDF5 dataset is not copied a second time.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .source import Dataset, FileSource, check_dataset, map_labels

SUFFIXES = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5"}
REQUIRED = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("x_val", "y_val", "classes")
KEYS = REQUIRED + OPTIONAL


class ArrayFile(FileSource):
    """data.path: FILE. `keys` maps a canonical name (x_train, ...) to the file's own key."""

    def __init__(self, path: str | Path, keys: dict[str, str] | None = None):
        super().__init__(path)
        self.keys = {name: (keys or {}).get(name, name) for name in KEYS}

    def _read(self) -> Dataset:
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found (data.path: an .npz or HDF5 file, or a folder of images)")
        kind = SUFFIXES.get(self.path.suffix.lower())
        if kind is None:
            raise DataError(f"{self.path}: expected an .npz, .h5 or .hdf5 file, or a folder of images")
        try:
            found = _read_npz(self.path, self.keys) if kind == "npz" else _read_hdf5(self.path, self.keys)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{self.path}: cannot read it as {kind} ({type(e).__name__}: {e})") from None
        return dataset_from(found, str(self.path), self.keys)


def dataset_from(found: dict, where: str, keys: dict[str, str] | None = None) -> Dataset:
    """A Dataset from arrays by canonical name (x_train, ...; `_all`: every name the file holds,
    for the message), labels mapped to 0..C-1. `keys`: the names the user knows them by."""
    keys = keys or {name: name for name in KEYS}
    missing = [keys[k] for k in REQUIRED if k not in found]
    if missing:
        have = ", ".join(sorted(found.get("_all", [k for k in found if not k.startswith("_")])))
        raise DataError(f"{where}: no {', '.join(missing)} (it holds {have}; map other names with data.keys, e.g. data.keys={{x_train: images}})")
    if ("x_val" in found) != ("y_val" in found):
        raise DataError(f"{where}: x_val and y_val come together (there is only one of them)")
    splits = [s for s in ("train", "test", "val") if f"x_{s}" in found]
    images = [_images(np.asarray(found[f"x_{s}"]), f"{where}: {keys[f'x_{s}']}") for s in splits]
    names = found.get("classes")
    labels, classes = map_labels([np.asarray(found[f"y_{s}"]) for s in splits], None if names is None else [_text(n) for n in names],
                                 f"{where}: labels")
    by = dict(zip(splits, zip(images, labels)))
    val = by.get("val", (None, None))
    return Dataset(*by["train"], *by["test"], classes=classes, x_val=val[0], y_val=val[1])


def save(ds: Dataset, folder: Path) -> Path:
    """`ds` as an .npz named by its digest in `folder` (written once, under a temporary name that
    is renamed into place): arrays given from Python become a file a run can name in data.path,
    so that eval and resume find them again."""
    check_dataset(ds, "data")
    path = Path(folder) / f"{ds.digest[:16]}.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **dict(ds.arrays()), classes=np.array(ds.classes))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_npz(path: Path, keys: dict[str, str]) -> dict:
    with np.load(path, allow_pickle=False) as f:  # no pickles: a data file cannot run code
        found = {name: f[key] for name, key in keys.items() if key in f.files}
        found["_all"] = list(f.files)
    return found


def _read_hdf5(path: Path, keys: dict[str, str]) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        found = {}
        for name, key in keys.items():
            if key in f and isinstance(f[key], h5py.Dataset):
                found[name] = f[key][()]  # one read into a new NumPy array
        found["_all"] = list(f.keys())
    return found


def _images(x: np.ndarray, where: str) -> np.ndarray:
    """[N, H, W] or [N, H, W, C] uint8 or float -> [N, H, W, C] uint8 or float32."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{where}: images must be [N, H, W] or [N, H, W, C], got shape {list(x.shape)}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise DataError(f"{where}: images hold NaN or infinite values")
        return x
    raise DataError(f"{where}: images must be uint8 (0..255) or float, got {x.dtype}")
