"""What every dataset source gives a run: images, labels, the class names, and an identity.

A source is one object (the built-in datasets in datasets.py, a user's arrays in arrays.py, a
folder of images in folders.py); `source_for` picks it from the spec's data section. Everything
downstream (config validation, the network, export, the ticket, eval) reads the image shape and
the classes from the source's `DataInfo`, never from a table of names.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class DataInfo:
    """The shape of one image (H, W, C) and the class names, in label order (label i is classes[i])."""

    image_shape: tuple[int, int, int]
    classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def to_attrs(self) -> dict:
        """As run.h5 keeps it (attributes of the file's root)."""
        return {"data_image_shape": list(self.image_shape), "data_classes": list(self.classes)}

    @classmethod
    def from_attrs(cls, attrs) -> DataInfo | None:
        if "data_image_shape" not in attrs:
            return None
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in np.asarray(attrs["data_classes"]).reshape(-1)]
        return cls(tuple(int(v) for v in np.asarray(attrs["data_image_shape"]).reshape(-1)), tuple(classes))


@dataclass
class Dataset:
    """Images [N, H, W, C] (uint8, or float32 already in the units the network sees before
    standardization) and int64 labels in 0..C-1, per split. x_val/y_val: a validation split the
    data itself provides (None: none)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...] = ()
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    digest: str = field(default="", repr=False)

    @property
    def info(self) -> DataInfo:
        return DataInfo(tuple(int(v) for v in self.x_train.shape[1:]), tuple(self.classes))

    def arrays(self) -> list[tuple[str, np.ndarray]]:
        out = [("x_train", self.x_train), ("y_train", self.y_train), ("x_test", self.x_test), ("y_test", self.y_test)]
        if self.x_val is not None:
            out += [("x_val", self.x_val), ("y_val", self.y_val)]
        return out


def content_digest(ds: Dataset) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, and the class names: the data's
    identity as run.h5 records it. Two sources that give the same arrays (MNIST as IDX files and
    as an .npz) have the same digest."""
    h = hashlib.sha256()
    for name, a in ds.arrays():
        a = np.ascontiguousarray(a)
        h.update(f"{name}:{a.dtype.str}:{list(a.shape)};".encode())
        h.update(memoryview(a).cast("B"))
    h.update(("\0".join(ds.classes)).encode())
    return h.hexdigest()


class Source(Protocol):
    """A dataset source. `label`: how reports name it (a built-in's name, a file's stem).
    `identity`: where it comes from, for run.h5 (the name, or the resolved path)."""

    label: str
    identity: str

    def info(self) -> DataInfo:
        """The image shape and classes, cheaply where the format allows (no full read)."""
        ...

    def load(self) -> Dataset:
        """Every split, checked: one DataError line naming the file for anything unreadable."""
        ...


class FileSource:
    """A source at a user's path (a file of arrays, a folder of images): read once by the
    subclass's `_read`, checked, then kept for info() and load()."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def label(self) -> str:
        return self.path.resolve().stem

    @property
    def identity(self) -> str:
        return str(self.path.resolve())

    @functools.cached_property
    def _dataset(self) -> Dataset:
        return check_dataset(self._read(), str(self.path))

    def info(self) -> DataInfo:
        return self._dataset.info

    def load(self) -> Dataset:
        return self._dataset

    def _read(self) -> Dataset:
        raise NotImplementedError


def check_dataset(ds: Dataset, where: str) -> Dataset:
    """One DataError naming `where` unless the arrays fit together: images [N, H, W, C] of one
    shape across the splits with one label each, labels in 0..C-1; then the digest is set."""
    shape = ds.x_train.shape[1:]
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test), ("val", ds.x_val, ds.y_val)):
        if x is None:
            continue
        if x.ndim != 4 or x.shape[1:] != shape or len(x) != len(y) or y.ndim != 1:
            raise DataError(f"{where}: {split} images are {list(x.shape)} with labels {list(y.shape)}, expected "
                            f"[N, {', '.join(map(str, shape))}] with N labels")
        if len(x) == 0 and split != "val":
            raise DataError(f"{where}: the {split} split is empty")
        if len(y) and not 0 <= y.min() <= y.max() < len(ds.classes):
            raise DataError(f"{where}: {split} labels outside 0..{len(ds.classes) - 1}")
    ds.digest = content_digest(ds)
    return ds


def map_labels(labels: list[np.ndarray], names: list[str] | None, where: str) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """Labels of any integers (or strings) -> int64 0..C-1 over the sorted set of values in every
    split, and the class names: `names` where given (one per label value, indexed by the value
    when the values are 0..C-1), else the values as text."""
    values = np.unique(np.concatenate([np.asarray(y).reshape(-1) for y in labels]))
    if values.size == 0:
        raise DataError(f"{where}: no labels")
    if not (np.issubdtype(values.dtype, np.integer) or values.dtype.kind in "US"):
        if np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)):
            values = values.astype(np.int64)
            labels = [np.asarray(y).astype(np.int64) for y in labels]
        else:
            raise DataError(f"{where}: labels must be integers or strings, got {values.dtype}")
    mapped = [np.searchsorted(values, np.asarray(y).reshape(-1)).astype(np.int64) for y in labels]
    if names is not None:
        if len(names) != values.size:
            raise DataError(f"{where}: {len(names)} class names for {values.size} label values")
        return mapped, tuple(str(n) for n in names)
    return mapped, tuple(str(v) for v in values.tolist())
