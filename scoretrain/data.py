"""Datasets: where the IDX files live, reading and verifying them, and standardizing inputs.

A dataset is four IDX files (train/test images and labels), optionally gzip-compressed.
Each file's SHA-256 is checked on the *uncompressed* bytes, so a locally re-compressed
copy verifies the same as the canonical one.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

REPO_DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: dict[str, tuple[str, str]]  # split part -> (file name, SHA-256 of the uncompressed file)


DATASETS = {
    "mnist": DatasetSpec(
        "mnist",
        {
            "train_images": ("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            "train_labels": ("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            "test_images": ("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            "test_labels": ("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        },
    ),
}


@dataclass
class Dataset:
    x_train: np.ndarray  # uint8 [N, features]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray


def cache_dir() -> Path:
    """The user cache for downloaded datasets ($SCORETRAIN_DATA, else $XDG_CACHE_HOME/scoretrain)."""
    if os.environ.get("SCORETRAIN_DATA"):
        return Path(os.environ["SCORETRAIN_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scoretrain"


def search_roots(root: str | None) -> list[Path]:
    return [Path(root)] if root else [REPO_DATA, cache_dir()]


def find_file(folder: Path, filename: str) -> Path | None:
    for candidate in (folder / filename, folder / (filename + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def locate(name: str, root: str | None) -> Path:
    """The first folder `<root>/<name>` that holds all of the dataset's files."""
    spec = DATASETS[name]
    tried = []
    for base in search_roots(root):
        folder = base / name
        tried.append(str(folder))
        if all(find_file(folder, fn) for fn, _ in spec.files.values()):
            return folder
    raise DataError(f"dataset {name}: files not found in {' or '.join(tried)} (expected {', '.join(fn for fn, _ in spec.files.values())}, optionally .gz)")


def read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """IDX: 2 zero bytes, a type code (0x08 = uint8), the number of dims, big-endian int32 sizes, data."""
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not a uint8 IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({len(raw) - header} data bytes, header says {int(np.prod(shape))})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_verified(folder: Path, filename: str, sha256: str) -> np.ndarray:
    path = find_file(folder, filename)
    if path is None:
        raise DataError(f"{folder / filename}: file not found")
    raw = read_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise DataError(f"{path}: SHA-256 mismatch (got {digest[:12]}…, expected {sha256[:12]}…): the file is corrupt or not {filename}")
    return parse_idx(raw, path)


def load(name: str, root: str | None = None) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"dataset {name}: unknown (known: {', '.join(DATASETS)})")
    folder = locate(name, root)
    arrays = {part: read_verified(folder, fn, sha) for part, (fn, sha) in DATASETS[name].files.items()}
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731 - images [N, 28, 28] -> [N, 784]
    return Dataset(
        flat(arrays["train_images"]), arrays["train_labels"].astype(np.int64),
        flat(arrays["test_images"]), arrays["test_labels"].astype(np.int64),
    )


def standardization(x_train: np.ndarray) -> tuple[float, float]:
    """Mean and std of the training inputs scaled to [0, 1] (one scalar each, as is usual for MNIST)."""
    x = x_train.astype(np.float64) / 255.0
    return float(x.mean()), float(x.std())


def to_float(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 images -> float32 standardized inputs."""
    out = x.astype(np.float32) / np.float32(255.0)
    out -= np.float32(mean)
    out /= np.float32(std)
    return out
