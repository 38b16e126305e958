"""Datasets: where the files live, downloading and verifying them, standardizing and augmenting inputs.

An MNIST-family dataset is four IDX files (train/test images and labels), optionally
gzip-compressed; CIFAR-10 and CIFAR-100 are one archive each (the python version), kept as
downloaded and read from in memory (nothing is extracted to disk); SVHN is two MATLAB files,
served uncompressed. A file verifies if its bytes match the SHA-256 of the canonical .gz on the
mirrors, or its uncompressed bytes match the SHA-256 of the uncompressed file (so a locally
re-compressed copy verifies too). With no explicit root, a dataset not on disk is downloaded once
into the user cache. Images are uint8 [N, H, W, C] (channels last).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib
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
from .source import DataInfo, Dataset, check_dataset

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
TIMEOUT = 30  # seconds per connection attempt / read, before the next mirror is tried


class Sha256(NamedTuple):
    raw: str | None  # of the uncompressed file (IDX, CIFAR's .tar, SVHN's .mat)
    gz: str | None  # of the canonical .gz file as served by the mirrors; None: served uncompressed


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: dict[str, tuple[str, Sha256]]  # split part (or "archive") -> (file name without .gz, its checksums)
    mirrors: tuple[str, ...]  # base URLs, tried in order; a file is at base + served_name(...)
    image_shape: tuple[int, int, int] = (28, 28, 1)  # H, W, C
    classes: tuple[str, ...] = tuple("0123456789")  # the class names, in label order
    format: str = "idx"  # how its files are parsed: a key of READERS


def served_name(filename: str, sums: Sha256) -> str:
    """The name a mirror serves a file under: its canonical .gz where that is what is published,
    else the file itself (SVHN's .mat files are served uncompressed)."""
    return filename + ".gz" if sums.gz is not None else filename


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
# - CIFAR-100 .tar.gz: SHA-256 from keras-team/keras keras/src/datasets/cifar100.py (the file_hash
#   of get_file for https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz), the same value as
#   torchvision's prototype datasets (torchvision/prototype/datasets/_builtin/cifar.py,
#   Cifar100._SHA256); records of it pair it with the size 169,001,437 bytes and the MD5
#   eb9058c3a382ffc7106e4002c42a8d85 that the dataset's page and torchvision's datasets/cifar.py
#   (CIFAR100.tgz_md5) publish. (TFDS's url_checksums/cifar100.txt lists only the binary version.)
#   The 100 class names (label order) are the archive's meta b"fine_label_names", checked on load.
# - SVHN .mat (served uncompressed): tensorflow/datasets tensorflow_datasets/url_checksums/
#   svhn_cropped.txt (train_32x32.mat 182,040,794 bytes, test_32x32.mat 64,275,384 bytes), the
#   same values as torchvision's prototype datasets (_builtin/svhn.py, SVHN._CHECKSUMS); independent
#   records pair them with those sizes and the MD5s that torchvision's datasets/svhn.py publishes
#   (e26dedcc434d2e4c54c9b2d4a06d8373, eb5a983be6a315427106f1b164d9cef3).
# Mirrors: torchvision's datasets/mnist.py (ossci, fashion-mnist S3, codh) and TFDS (cvdf);
# CIFAR-10 and CIFAR-100: the dataset author's page; SVHN: the dataset's page (plain HTTP only,
# as published; the checksum is what vouches for the bytes).
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
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
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
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),  # the ten Kuzushiji characters
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        {"archive": ("cifar-10-python.tar", Sha256(None, "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"))},
        ("https://www.cs.toronto.edu/~kriz/",),
        (32, 32, 3),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        "cifar10",
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        {"archive": ("cifar-100-python.tar", Sha256(None, "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"))},
        ("https://www.cs.toronto.edu/~kriz/",),
        (32, 32, 3),
        ("apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
         "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
         "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
         "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
         "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
         "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
         "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
         "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
         "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
         "willow_tree", "wolf", "woman", "worm"),
        "cifar100",
    ),
    "svhn": DatasetSpec(
        "svhn",
        {
            "train": ("train_32x32.mat", Sha256("435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8", None)),
            "test": ("test_32x32.mat", Sha256("cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b", None)),
        },
        ("http://ufldl.stanford.edu/housenumbers/",),
        (32, 32, 3),
        format="svhn",
    ),
}



@dataclass(frozen=True)
class Builtin:
    """A built-in dataset as a source: its files found under `root` (or the repo's data/, the
    user cache, a download), verified against the published checksums, then parsed."""

    name: str
    root: str | None = None

    @property
    def label(self) -> str:
        return self.name

    @property
    def identity(self) -> str:
        return self.name

    def info(self) -> DataInfo:
        spec = spec_of(self.name)
        return DataInfo(spec.image_shape, spec.classes)

    def load(self) -> Dataset:
        return load(self.name, self.root)


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
    """Fetch the file as served (served_name) from the first mirror that serves a verified copy;
    returns (path, URL). Each attempt goes to a temporary file in `folder` that is renamed into
    place only once it verifies, so no reader (nor a parallel run downloading the same file) ever
    sees a partial file."""
    served = served_name(filename, sums)
    dest = folder / served
    tried = []
    for base in mirrors(spec):
        url = base + served
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{served}.", suffix=".part", dir=folder)
            os.close(fd)
        except OSError as e:
            raise DataError(f"dataset {spec.name}: cannot write to {folder} ({e})") from None
        bar = DownloadBar()
        try:
            print(f"downloading {url}", file=sys.stderr, flush=True)
            http_get(url, Path(tmp), bar)
            check(Path(tmp).read_bytes(), served.endswith(".gz"), sums)
            os.replace(tmp, dest)
            return dest, url
        except (OSError, ValueError, http.client.HTTPException, DataError) as e:
            tried.append(f"{url}: {failure(e)}")  # OSError covers URLError, HTTPError and timeouts
        finally:
            bar.stop()
            Path(tmp).unlink(missing_ok=True)
    raise DataError(f"dataset {spec.name}: could not download {served} from any mirror ({'; '.join(tried)})")


def fetch(name: str, root: str | None = None) -> tuple[Path, list[tuple[Path, str]]]:
    """Make sure every file of dataset `name` is on disk and verifies; returns the folder and, per
    file, (path, what happened). With no root: the repo's complete copy if there is one (verified,
    never overwritten), else the user cache. Missing or corrupt files are (re)downloaded. A fetch
    that fails leaves nothing behind: the files it downloaded and the folders it made go again."""
    spec = spec_of(name)
    if root is None and complete(REPO_DATA / name, spec):
        folder, may_download = REPO_DATA / name, False
    else:
        folder, may_download = (Path(root) if root is not None else cache_dir()) / name, True
    made = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove(made)
        raise DataError(f"dataset {name}: cannot create {folder} ({e})") from None
    report, downloaded = [], []
    try:
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
            downloaded.append(new)
            if path is not None and path != new:
                path.unlink()  # a bad copy under the other name would shadow the good one
            report.append((new, f"downloaded from {url}, verified"))
    except BaseException:  # a failure, Ctrl-C or SIGTERM
        _remove(downloaded + made)
        raise
    return folder, report


def _remove(paths: list[Path]) -> None:
    """Remove these files and (empty) folders, in order; whatever another process has put in a
    folder meanwhile keeps it."""
    for p in paths:
        try:
            p.rmdir() if p.is_dir() else p.unlink(missing_ok=True)
        except OSError:
            pass


# ----------------------------------------------------------------------------- loading


def load(name: str, root: str | None = None) -> Dataset:
    """The dataset's images (uint8 [N, H, W, C], as its spec says) and labels (int64 [N]), read only
    from verified files, found (or downloaded into the cache) as `locate` says."""
    spec = spec_of(name)
    needs(spec)  # before any download
    folder = locate(name, root)
    raw = {part: read_verified(folder, fn, sums) for part, (fn, sums) in spec.files.items()}
    ds = READERS[spec.format](raw)
    check_shapes(ds, name, folder)
    ds.classes = spec.classes
    return check_dataset(ds, f"dataset {name} in {folder}")


# format -> (the module it is parsed with, the extra that installs it), for the formats that need one
NEEDS = {"svhn": ("scipy", "svhn")}


def needs(spec: DatasetSpec) -> None:
    if spec.format in NEEDS:
        module, extra = NEEDS[spec.format]
        try:
            importlib.import_module(module)
        except ImportError:
            raise DataError(f"dataset {spec.name}: reading its files needs {module}: pip install 'scoretrain[{extra}]'") from None


def read_idx(raw: dict[str, tuple[bytes, Path]]) -> Dataset:
    """The MNIST family: four IDX files, images [N, 28, 28] and labels [N]."""
    images = lambda part: parse_idx(*raw[part])[..., None]  # noqa: E731 - [N, H, W] -> [N, H, W, 1]
    labels = lambda part: parse_idx(*raw[part]).astype(np.int64)  # noqa: E731
    return Dataset(images("train_images"), labels("train_labels"), images("test_images"), labels("test_labels"))


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR archive (the python version) keeps its pickled batches, and their keys."""

    title: str  # for errors: "CIFAR-10"
    folder: str  # the folder inside the archive
    batches: dict[str, tuple[str, ...]]  # split -> its batch files, in order
    labels: bytes  # the batches' key of the labels
    names: tuple[str, bytes] | None = None  # (meta file, its key of the class names), read and checked on load

    def read(self, raw: dict[str, tuple[bytes, Path]]) -> Dataset:
        """The dataset from the bytes of its (verified, uncompressed) tar. Only the expected members
        are read, by name, straight into memory: nothing is extracted, so no entry of the archive
        can write anywhere (no path traversal, no links)."""
        tar, path = raw["archive"]
        try:
            with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
                split = lambda s: [self.batch(archive, b, path) for b in self.batches[s]]  # noqa: E731
                train, test = split("train"), split("test")
                classes = self.class_names(archive, path) if self.names else ()
        except tarfile.TarError as e:
            raise DataError(f"{path}: not a readable tar archive ({e})") from None
        # C order for [N, 32, 32, 3] (concatenate would keep the transposed batches' layout)
        join = lambda batches, i: np.ascontiguousarray(np.concatenate([b[i] for b in batches]))  # noqa: E731
        return Dataset(join(train, 0), join(train, 1), join(test, 0), join(test, 1), classes=classes)

    def member(self, archive: tarfile.TarFile, name: str, path: Path) -> dict:
        """A pickled member of the archive, by name."""
        name = f"{self.folder}/{name}"
        try:
            member = archive.getmember(name)
        except KeyError:
            raise DataError(f"{path}: {name} is missing from the archive") from None
        if not member.isfile():
            raise DataError(f"{path}: {name} in the archive is not a regular file")
        # pickle can run arbitrary code while loading, so it only ever sees bytes of an archive whose
        # SHA-256 matched the published one (read_verified checked it before this is called).
        d = pickle.load(archive.extractfile(member), encoding="bytes")
        if not isinstance(d, dict):
            raise TypeError(f"a pickled {type(d).__name__}, not a dict")
        return d

    def batch(self, archive: tarfile.TarFile, batch: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """One batch: a pickled dict with b"data" (uint8 [n, 3072]: per image the 1024 red, then
        green, then blue pixels, each 32x32 row-major) and the labels (n ints) -> (uint8 [n, 32, 32, 3],
        int64 [n])."""
        try:
            d = self.member(archive, batch, path)
            x, y = np.asarray(d[b"data"]), np.asarray(d[self.labels], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise DataError(f"{path}: {self.folder}/{batch} is not a {self.title} batch ({type(e).__name__}: {e})") from None
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
            raise DataError(f"{path}: {self.folder}/{batch} is not a {self.title} batch (data {x.dtype} {list(x.shape)}, {y.size} labels)")
        return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y  # CHW -> HWC (a view; read copies)

    def class_names(self, archive: tarfile.TarFile, path: Path) -> tuple[str, ...]:
        meta, key = self.names
        try:
            return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in self.member(archive, meta, path)[key])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise DataError(f"{path}: {self.folder}/{meta} holds no class names ({type(e).__name__}: {e})") from None


CIFAR10 = CifarLayout("CIFAR-10", "cifar-10-batches-py",
                      {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}, b"labels")
CIFAR100 = CifarLayout("CIFAR-100", "cifar-100-python", {"train": ("train",), "test": ("test",)}, b"fine_labels",
                       ("meta", b"fine_label_names"))


def read_svhn(raw: dict[str, tuple[bytes, Path]]) -> Dataset:
    """SVHN's cropped digits: per split a MATLAB (v5) file with X uint8 [32, 32, 3, N] and y [N, 1],
    the digits 1..9 labelled 1..9 and the digit 0 labelled 10 (here 0)."""
    return Dataset(*svhn_split(*raw["train"]), *svhn_split(*raw["test"]))


def svhn_split(blob: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        m = loadmat(io.BytesIO(blob), variable_names=("X", "y"))
        x, y = np.asarray(m["X"]), np.asarray(m["y"])
    except (MatReadError, KeyError, ValueError, TypeError, OSError, EOFError, NotImplementedError) as e:
        raise DataError(f"{path}: not an SVHN .mat file ({type(e).__name__}: {e})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.shape != (x.shape[-1], 1):
        raise DataError(f"{path}: not an SVHN .mat file (X {x.dtype} {list(x.shape)}, y {list(y.shape)}; "
                        "expected X uint8 [32, 32, 3, N] and y [N, 1])")
    y = y.reshape(-1).astype(np.int64)
    if y.size and not 1 <= y.min() <= y.max() <= 10:
        raise DataError(f"{path}: labels outside 1..10 (SVHN labels the digit 0 as 10)")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), y % 10


READERS = {"idx": read_idx, "cifar10": CIFAR10.read, "cifar100": CIFAR100.read, "svhn": read_svhn}


def check_shapes(ds: Dataset, name: str, folder: Path) -> None:
    """Class names (where the files hold them), images as the spec says, one label per image, labels
    below the number of classes. Verified files always pass: this catches a registry entry that does not fit its files."""
    spec = spec_of(name)
    if ds.classes and ds.classes != spec.classes:
        raise DataError(f"dataset {name} in {folder}: the files name {len(ds.classes)} classes ({', '.join(ds.classes[:3])}, …), "
                        f"not the {len(spec.classes)} expected ({', '.join(spec.classes[:3])}, …)")
    (h, w, c), classes = spec.image_shape, len(spec.classes)
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
    """Per-channel mean and (population) std of images [..., C], uint8 ones scaled to [0, 1]: two
    lists of C floats (one each for MNIST: 0.1307, 0.3081). For uint8 images, computed exactly
    from each channel's histogram of the 256 pixel values, so no float copy of the training set is
    made; float images are summed in float64, a block of images at a time."""
    if x_train.dtype != np.uint8:
        return _float_standardization(x_train)
    values = np.arange(256) / 255.0
    mean, std = [], []
    for c in range(x_train.shape[-1]):
        counts = np.bincount(x_train[..., c].ravel(), minlength=256)
        m = counts @ values / counts.sum()
        mean.append(float(m))
        std.append(float(np.sqrt(counts @ (values - m) ** 2 / counts.sum())))
    return mean, std


def _float_standardization(x: np.ndarray, block: int = 4096) -> tuple[list[float], list[float]]:
    c = x.shape[-1]
    total, n = np.zeros(c), x.size // c
    for i in range(0, len(x), block):
        total += x[i : i + block].reshape(-1, c).sum(axis=0, dtype=np.float64)
    mean, sq = total / n, np.zeros(c)
    for i in range(0, len(x), block):
        sq += ((x[i : i + block].reshape(-1, c).astype(np.float64) - mean) ** 2).sum(axis=0)
    std = np.sqrt(sq / n)
    return mean.tolist(), np.where(std > 0, std, 1.0).tolist()  # a constant channel is only centred


def to_float(x: np.ndarray, mean, std) -> np.ndarray:
    """Images [..., C] -> float32 `(x / 255 - mean) / std` (uint8; float images: `(x - mean) / std`),
    the same shape. `mean` and `std`
    are per-channel (lists of C floats, as `standardization` returns) or single floats for every
    channel (also a one-element list). Standardize before flattening images for an MLP: a
    per-channel list needs the channels on the last axis."""
    mean, std = (np.asarray(v, np.float32).reshape(-1) for v in (mean, std))
    if not {mean.size, std.size} <= {1, x.shape[-1]}:
        raise ValueError(f"to_float: {mean.size} means and {std.size} stds for {x.shape[-1]} channels")
    out = x.astype(np.float32)
    if x.dtype == np.uint8:
        out /= np.float32(255.0)
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
