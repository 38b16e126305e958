"""Datasets: where the files live, downloading and verifying them, standardizing and augmenting inputs.

An MNIST-family dataset is four IDX files (train/test images and labels), optionally
gzip-compressed; CIFAR-10 is one archive, cifar-10-python.tar.gz, kept as downloaded and read
from in memory (nothing is extracted to disk). A file verifies if its bytes match the SHA-256 of
the canonical .gz on the mirrors, or its uncompressed bytes match the SHA-256 of the uncompressed
file (so a locally re-compressed copy verifies too). With no explicit root, a dataset not on disk
is downloaded once into the user cache. Images are uint8 [N, H, W, C] (channels last).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pickle
import struct
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .. import __version__
from ..errors import DataError

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
TIMEOUT = 30  # seconds per connection attempt / read, before the next mirror is tried


class Sha256(NamedTuple):
    raw: str | None  # of the uncompressed file (IDX, or CIFAR-10's .tar)
    gz: str | None  # of the canonical .gz file as served by the mirrors


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: dict[str, tuple[str, Sha256]]  # split part (or "archive") -> (file name without .gz, its checksums)
    mirrors: tuple[str, ...]  # base URLs, tried in order; a file is at base + name + ".gz"


def _files(train_images, train_labels, test_images, test_labels) -> dict[str, tuple[str, Sha256]]:
    return {
        "train_images": ("train-images-idx3-ubyte", Sha256(*train_images)),
        "train_labels": ("train-labels-idx1-ubyte", Sha256(*train_labels)),
        "test_images": ("t10k-images-idx3-ubyte", Sha256(*test_images)),
        "test_labels": ("t10k-labels-idx1-ubyte", Sha256(*test_labels)),
    }


# Sources of the checksums (never computed here from an unverified download):
# - MNIST uncompressed: data/mnist/SHA256SUMS.uncompressed (the shipped, verified copy).
# - MNIST .gz: tensorflow/datasets tensorflow_datasets/url_checksums/mnist.txt (cvdf mirror),
#   the same values as torchvision-ruby's MNIST resources (ossci mirror).
# - Fashion-MNIST .gz: tensorflow/datasets tensorflow_datasets/url_checksums/fashion_mnist.txt.
# - KMNIST .gz: tensorflow/datasets tensorflow_datasets/url_checksums/kmnist.txt, the same values
#   as torchvision-ruby's KMNIST resources.
# - CIFAR-10 .tar.gz: SHA-256 from keras-team/keras keras/src/datasets/cifar10.py (the file_hash
#   of get_file for https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz); several independent
#   records pair it with the size 170,498,071 bytes and the MD5 c58f30108f718f92721af3b95e74349a
#   that the dataset's page (https://www.cs.toronto.edu/~kriz/cifar.html) and torchvision's
#   datasets/cifar.py (tgz_md5) publish. (TFDS's url_checksums/cifar10.txt lists only the
#   binary version.) No SHA-256 of the uncompressed .tar is published: keep the .tar.gz.
# Mirrors: torchvision's datasets/mnist.py (ossci, fashion-mnist S3, codh) and TFDS (cvdf);
# CIFAR-10: the dataset author's page.
DATASETS = {
    "mnist": DatasetSpec(
        "mnist",
        _files(
            ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            ("65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            ("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            ("ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        ),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        _files(
            (None, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
            (None, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
            (None, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
            (None, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        ),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ),
    "kmnist": DatasetSpec(
        "kmnist",
        _files(
            (None, "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4"),
            (None, "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17"),
            (None, "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5"),
            (None, "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c"),
        ),
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        {"archive": ("cifar-10-python.tar", Sha256(None, "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"))},
        ("https://www.cs.toronto.edu/~kriz/",),
    ),
}

# Per dataset: image height, width, channels, and the number of classes.
SHAPES = {
    "mnist": (28, 28, 1, 10),
    "fashion-mnist": (28, 28, 1, 10),
    "kmnist": (28, 28, 1, 10),
    "cifar10": (32, 32, 3, 10),
}

CIFAR_DIR = "cifar-10-batches-py"  # the folder inside the archive
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


@dataclass
class Dataset:
    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray


def cache_dir() -> Path:
    """The user cache for downloaded datasets ($SCORETRAIN_DATA, else $XDG_CACHE_HOME/scoretrain)."""
    if os.environ.get("SCORETRAIN_DATA"):
        return Path(os.environ["SCORETRAIN_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scoretrain"


def spec_of(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"dataset {name}: unknown (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def find_file(folder: Path, filename: str) -> Path | None:
    for candidate in (folder / filename, folder / (filename + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def complete(folder: Path, spec: DatasetSpec) -> bool:
    return all(find_file(folder, fn) for fn, _ in spec.files.values())


def locate(name: str, root: str | None) -> Path:
    """The first folder `<root>/<name>` that holds all of the dataset's files. With no explicit
    root: the repo's data/, then the user cache, else download into the cache."""
    spec = spec_of(name)
    folders = [Path(root) / name] if root is not None else [REPO_DATA / name, cache_dir() / name]
    for folder in folders:
        if complete(folder, spec):
            return folder
    if root is None:
        return fetch(name)[0]
    # an explicit root is the user saying "the files are here": never download behind their back
    # a file with only its .gz checksum known must be the .gz; one with both may be either
    expected = ", ".join(fn + (".gz" if sums.raw is None else "[.gz]") for fn, sums in spec.files.values())
    raise DataError(f"dataset {name}: files not found in {' or '.join(map(str, folders))} (expected {expected})")


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def check(blob: bytes, is_gz: bool, sums: Sha256) -> bytes:
    """The uncompressed bytes of a file whose bytes match one of its known checksums;
    else DataError with the reason (no path: the callers add where the bytes came from)."""
    if is_gz and sums.gz is not None and sha256(blob) == sums.gz:
        return gzip.decompress(blob)  # the canonical .gz itself
    if sums.raw is None:  # only the .gz checksum is known: nothing else can match
        if is_gz:
            raise DataError(f"SHA-256 mismatch (got {sha256(blob)[:12]}…, expected {sums.gz[:12]}…)")
        raise DataError("cannot verify an uncompressed copy (only the SHA-256 of the canonical .gz is known): keep the .gz file")
    try:
        raw = gzip.decompress(blob) if is_gz else blob
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read ({e})") from None
    got = sha256(raw)
    if got != sums.raw:
        raise DataError(f"SHA-256 mismatch (got {got[:12]}…, expected {sums.raw[:12]}…)")
    return raw


def read_verified(folder: Path, filename: str, sums: Sha256) -> tuple[bytes, Path]:
    """The verified, uncompressed bytes of `filename` in folder, and the path they came from."""
    path = find_file(folder, filename)
    if path is None:
        raise DataError(f"{folder / filename}: file not found")
    try:
        raw = check(path.read_bytes(), path.suffix == ".gz", sums)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    except DataError as e:
        hint = f": the file is corrupt or not {filename}" if str(e).startswith("SHA-256 mismatch") else ""
        raise DataError(f"{path}: {e}{hint}") from None
    return raw, path


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


# ----------------------------------------------------------------------------- downloading


def mirrors(spec: DatasetSpec) -> list[str]:
    """$SCORETRAIN_MIRRORS (comma-separated base URLs, `{name}` replaced by the dataset's name)
    overrides the built-in list: for a proxy or a local copy, and for the tests."""
    env = os.environ.get("SCORETRAIN_MIRRORS", "").strip()
    bases = [b.strip() for b in env.split(",") if b.strip()] if env else list(spec.mirrors)
    return [b.replace("{name}", spec.name).rstrip("/") + "/" for b in bases]


def http_get(url: str, dest: Path, bar=None) -> None:
    """Stream url into dest; raises on a connection or HTTP error and on a short body. `bar`
    (DownloadBar) shows the bytes as they come."""
    request = urllib.request.Request(url, headers={"User-Agent": f"scoretrain/{__version__} (+urllib)"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response, open(dest, "wb") as f:
        size, promised = 0, response.headers.get("Content-Length")
        if bar is not None:
            bar.start(url.rsplit("/", 1)[-1], int(promised) if promised else None)
        while chunk := response.read(1 << 20):
            f.write(chunk)
            size += len(chunk)
            if bar is not None:
                bar.advance(len(chunk))
    # a server that closes early can end the stream without an error: compare with what it promised
    expected = response.headers.get("Content-Length")
    if expected is not None and int(expected) != size:
        raise http.client.IncompleteRead(b"", int(expected) - size)


def failure(e: Exception) -> str:
    """A short reason for one failed attempt, for the one-line error."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    if isinstance(e, http.client.IncompleteRead):
        return f"truncated ({e.expected} bytes missing)" if e.expected else "truncated"
    return str(e) or type(e).__name__


class DownloadBar:
    """A download's bar: bytes so far of the whole, rate, time left; on stderr, and only while
    that is a terminal (in a log, the `downloading URL` line alone)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = None

    def start(self, name: str, total: int | None) -> None:
        if not self.console.is_terminal:
            return
        self.progress = Progress(TextColumn(name), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task(name, total=total)
        self.progress.start()

    def advance(self, n: int) -> None:
        if self.progress:
            self.progress.advance(self.task, n)

    def stop(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None


def download(spec: DatasetSpec, filename: str, sums: Sha256, folder: Path) -> tuple[Path, str]:
    """Fetch `filename`.gz from the first mirror that serves a verified copy; returns (path, URL).
    Each attempt goes to a temporary file in `folder` that is renamed into place only once it
    verifies, so no reader (nor a parallel run downloading the same file) ever sees a partial file."""
    dest = folder / (filename + ".gz")
    tried = []
    for base in mirrors(spec):
        url = base + filename + ".gz"
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{filename}.gz.", suffix=".part", dir=folder)
            os.close(fd)
        except OSError as e:
            raise DataError(f"dataset {spec.name}: cannot write to {folder} ({e})") from None
        bar = DownloadBar()
        try:
            print(f"downloading {url}", file=sys.stderr, flush=True)
            http_get(url, Path(tmp), bar)
            check(Path(tmp).read_bytes(), True, sums)
            os.replace(tmp, dest)
            return dest, url
        except (OSError, ValueError, http.client.HTTPException, DataError) as e:
            tried.append(f"{url}: {failure(e)}")  # OSError covers URLError, HTTPError and timeouts
        finally:
            bar.stop()
            Path(tmp).unlink(missing_ok=True)
    raise DataError(f"dataset {spec.name}: could not download {filename}.gz from any mirror ({'; '.join(tried)})")


def fetch(name: str, root: str | None = None) -> tuple[Path, list[tuple[Path, str]]]:
    """Make sure every file of dataset `name` is on disk and verifies; returns the folder and, per
    file, (path, what happened). With no root: the repo's complete copy if there is one (verified,
    never overwritten), else the user cache. Missing or corrupt files are (re)downloaded."""
    spec = spec_of(name)
    if root is None and complete(REPO_DATA / name, spec):
        folder, may_download = REPO_DATA / name, False
    else:
        folder, may_download = (Path(root) if root is not None else cache_dir()) / name, True
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"dataset {name}: cannot create {folder} ({e})") from None
    report = []
    for fn, sums in spec.files.values():
        path = find_file(folder, fn)
        if path is not None:
            try:
                check(path.read_bytes(), path.suffix == ".gz", sums)
                report.append((path, "present, verified"))
                continue
            except (OSError, DataError) as e:
                if not may_download:
                    raise DataError(f"{path}: {e}") from None
        new, url = download(spec, fn, sums, folder)
        if path is not None and path != new:
            path.unlink()  # a bad uncompressed copy would shadow the good .gz
        report.append((new, f"downloaded from {url}, verified"))
    return folder, report


# ----------------------------------------------------------------------------- loading


def load(name: str, root: str | None = None) -> Dataset:
    """The dataset's images (uint8 [N, H, W, C], as in SHAPES) and labels (int64 [N]), read only
    from verified files, found (or downloaded into the cache) as `locate` says."""
    spec = spec_of(name)
    folder = locate(name, root)
    raw = {part: read_verified(folder, fn, sums) for part, (fn, sums) in spec.files.items()}
    if "archive" in raw:
        ds = read_cifar(*raw["archive"])
    else:
        images = lambda part: parse_idx(*raw[part])[..., None]  # noqa: E731 - [N, H, W] -> [N, H, W, 1]
        labels = lambda part: parse_idx(*raw[part]).astype(np.int64)  # noqa: E731
        ds = Dataset(images("train_images"), labels("train_labels"), images("test_images"), labels("test_labels"))
    check_shapes(ds, name, folder)
    return ds


def read_cifar(tar: bytes, path: Path) -> Dataset:
    """CIFAR-10 from the bytes of its (verified, uncompressed) python-version tar. Only the six
    expected batches are read, by name, straight into memory: nothing is extracted, so no entry
    of the archive can write anywhere (no path traversal, no links)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
            split = lambda s: [cifar_batch(archive, b, path) for b in CIFAR_BATCHES[s]]  # noqa: E731
            train, test = split("train"), split("test")
    except tarfile.TarError as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from None
    # C order for [N, 32, 32, 3] (concatenate would keep the transposed batches' layout)
    join = lambda batches, i: np.ascontiguousarray(np.concatenate([b[i] for b in batches]))  # noqa: E731
    return Dataset(join(train, 0), join(train, 1), join(test, 0), join(test, 1))


def cifar_batch(archive: tarfile.TarFile, batch: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: a pickled dict with b"data" (uint8 [n, 3072]: per image the 1024 red, then green,
    then blue pixels, each 32x32 row-major) and b"labels" (n ints) -> (uint8 [n, 32, 32, 3], int64 [n])."""
    name = f"{CIFAR_DIR}/{batch}"
    try:
        member = archive.getmember(name)
    except KeyError:
        raise DataError(f"{path}: {name} is missing from the archive") from None
    if not member.isfile():
        raise DataError(f"{path}: {name} in the archive is not a regular file")
    try:
        # pickle can run arbitrary code while loading, so it only ever sees bytes of an archive whose
        # SHA-256 matched the published one (read_verified checked it before this is called).
        d = pickle.load(archive.extractfile(member), encoding="bytes")
        x, y = np.asarray(d[b"data"]), np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DataError(f"{path}: {name} is not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
        raise DataError(f"{path}: {name} is not a CIFAR-10 batch (data {x.dtype} {list(x.shape)}, {y.size} labels)")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y  # CHW -> HWC (a view; read_cifar copies)


def check_shapes(ds: Dataset, name: str, folder: Path) -> None:
    """Images as SHAPES says, one label per image, labels below the number of classes. Verified
    files always pass: this catches a registry entry that does not fit its files."""
    h, w, c, classes = SHAPES[name]
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x.shape[1:] != (h, w, c) or len(x) != len(y):
            raise DataError(f"dataset {name} in {folder}: {split} images are {list(x.shape)} with {len(y)} labels, expected [N, {h}, {w}, {c}] with N labels")
        if len(y) and not 0 <= y.min() <= y.max() < classes:
            raise DataError(f"dataset {name} in {folder}: {split} labels outside 0..{classes - 1}")


VAL_SEED = 1729  # the validation split's own seed: the same held-out images whatever the run's seed


def validation_split(n: int, val: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of n training images, val of them held out: the first
    val of numpy.random.default_rng(VAL_SEED).permutation(n), so a smaller split is part of a
    larger one. Both in increasing order."""
    held = np.zeros(n, bool)
    held[np.random.default_rng(VAL_SEED).permutation(n)[:val]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def standardization(x_train: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images [..., C] scaled to [0, 1]: two lists
    of C floats (one each for MNIST: 0.1307, 0.3081). Computed exactly from each channel's
    histogram of the 256 pixel values, so no float copy of the training set is made."""
    values = np.arange(256) / 255.0
    mean, std = [], []
    for c in range(x_train.shape[-1]):
        counts = np.bincount(x_train[..., c].ravel(), minlength=256)
        m = counts @ values / counts.sum()
        mean.append(float(m))
        std.append(float(np.sqrt(counts @ (values - m) ** 2 / counts.sum())))
    return mean, std


def to_float(x: np.ndarray, mean, std) -> np.ndarray:
    """uint8 images [..., C] -> float32 `(x / 255 - mean) / std`, the same shape. `mean` and `std`
    are per-channel (lists of C floats, as `standardization` returns) or single floats for every
    channel (also a one-element list). Standardize before flattening images for an MLP: a
    per-channel list needs the channels on the last axis."""
    mean, std = (np.asarray(v, np.float32).reshape(-1) for v in (mean, std))
    if not {mean.size, std.size} <= {1, x.shape[-1]}:
        raise ValueError(f"to_float: {mean.size} means and {std.size} stds for {x.shape[-1]} channels")
    out = x.astype(np.float32) / np.float32(255.0)
    out -= mean
    out /= std
    return out


# ----------------------------------------------------------------------------- augmentation


def augment(xp, x, rng: np.random.Generator, padding: int, flip: bool):
    """A randomly cropped and flipped copy of a training batch (the usual CIFAR augmentation).

    x: float images [B, H, W, C] (channels last), an `xp` array already on the device; xp is
    numpy or cupy (the same code runs on both). padding: the crop's zero padding in pixels
    (config `data.crop_padding`; 4 for 32x32 CIFAR-10, 0: no crop). flip: random horizontal
    flips (config `data.flip`).

    All random numbers are drawn on the host from `rng` (a numpy Generator owned by the caller),
    so a generator state gives the same augmentation on NumPy and CuPy, and a resumed run that
    restores or re-derives the state (e.g. from (seed, epoch)) repeats it exactly. Exactly these
    draws are made, in this order, each only when enabled:
      1. padding > 0: `rng.integers(0, 2 * padding + 1, size=(B, 2))`, per image the crop's
         row and column offsets (dy, dx) in the padded image (dy = dx = padding: no shift);
      2. flip: `rng.integers(0, 2, size=B)`, per image 1 = mirror left-right.
    Output image b is `x[b]` zero-padded by `padding` on both sides of H and W, cropped to
    `[dy:dy + H, dx:dx + W]`, then reversed along W if its flip bit is 1. The zeros are in the
    batch's own units: on standardized inputs that is the channel mean, not black.

    Returns a new array of x's shape and dtype (one vectorized gather, no loop over images); with
    padding == 0 and flip False nothing is drawn and x itself is returned.
    """
    if x.ndim != 4 or padding < 0:
        raise ValueError(f"augment: expected images [B, H, W, C] and padding >= 0, got shape {x.shape}, padding {padding}")
    if padding == 0 and not flip:
        return x
    b, h, w, _ = x.shape
    offsets = rng.integers(0, 2 * padding + 1, size=(b, 2)) if padding > 0 else np.zeros((b, 2), np.int64)
    flips = rng.integers(0, 2, size=b).astype(bool) if flip else np.zeros(b, bool)
    # source row/column in the padded image of each output pixel; a flip reads columns backwards
    rows = offsets[:, :1] + np.arange(h)  # [B, H]
    cols = offsets[:, 1:] + np.where(flips[:, None], np.arange(w)[::-1], np.arange(w))  # [B, W]
    p = padding
    padded = xp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
    dev = lambda a: xp.asarray(a)  # noqa: E731 - the index arrays are small: B * (1 + H + W)
    return padded[dev(np.arange(b))[:, None, None], dev(rows)[:, :, None], dev(cols)[:, None, :]]
