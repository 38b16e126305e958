"""A folder of images as a dataset (data.path: DIR), in torchvision's ImageFolder layout:

    DIR/train/<class>/<image>    DIR/test/<class>/<image>    and optionally DIR/val/<class>/<image>

The classes are train's class folders sorted by name (label i is the i-th), and within a class the
images are in the order torchvision's `make_dataset` gives: `sorted(os.walk(class_folder,
followlinks=True))`, each folder's file names sorted, so a class folder may have subfolders. An
image is a file whose name ends (in any case) with one of torchvision's IMG_EXTENSIONS; other files
are ignored. test/ and val/ may lack some of train's classes, never have others.

Images are decoded with Pillow (the `images` extra) into uint8 [N, H, W, C]: a grayscale image
(modes 1, L, LA, I, F) to one channel, any other (RGB, RGBA, palette, CMYK, ...) to RGB, as
Pillow's `convert` does (alpha dropped). If any image of the folder is colour, every image becomes
RGB (a grayscale one with R = G = B, as `convert("RGB")` gives), so C is 1 or 3 for the whole set.
`image_size` (int: square, or [height, width]) resizes every image with Pillow's bilinear filter
(`Image.resize(..., Resampling.BILINEAR)`, which antialiases when shrinking): what torchvision's
`Resize((height, width))` does to a PIL image. (An int here means a square; torchvision's
`Resize(int)` would keep the aspect ratio instead.) Without it, every image must have one size.

The decoded arrays are cached once, as one .npz under the user cache (`cache_dir()/folders/`),
keyed by the folder's path, every image's relative name, size and modification time, the image
size and Pillow's version: a later run with the same files loads the cache instead of decoding,
and any change to the files decodes them again. The cache is written to a temporary name and
renamed into place, so a parallel run never reads a partial one, and the data folder itself is
only read (it may be read-only).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import DataError
from .source import Dataset, FileSource

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLITS = ("train", "test", "val")  # val: optional
GRAY_BANDS = ("1", "L", "I", "F")  # the first band of a grayscale mode (1, L, LA, I, I;16, F)
CACHE_FORMAT = 1  # part of every cache key: bump it when what a cache holds changes
BLOCK = 256  # images a worker decodes per task (one task per image costs more than a small image)
# Threads pay only for large images: measured on two cores, two threads took twice as long as one
# on 28x28 PNGs (Python's own work per image dominates and holds the GIL) and half as long on
# 256x256 JPEGs (Pillow's decoding, which releases it); about even at 128x128.
THREADED_PIXELS = 128 * 128


class ImageFolder(FileSource):
    """data.path: DIR, a folder of class folders of images (see the module's docstring), decoded
    or read from the cache once."""

    def __init__(self, path: str | Path, image_size: int | list[int] | tuple[int, int] | None = None,
                 threads: int | None = None):
        super().__init__(path)
        self.size = _size(image_size)
        self.threads = threads or min(4, os.cpu_count() or 1)

    def _read(self) -> Dataset:
        pil = _pillow(self.path)
        splits, classes = scan(self.path)
        files = [(rel, stat) for entries in splits.values() for rel, _, stat in entries]
        cache = cache_file(self.path, self.size, files, pil.__version__)
        arrays = read_cache(cache, {s: len(e) for s, e in splits.items()})
        if arrays is None:
            x = decode_all([self.path / rel for rel, _ in files], self.size, self.threads)
            arrays, start = {}, 0
            for split, entries in splits.items():
                arrays[f"x_{split}"] = x[start : start + len(entries)]
                arrays[f"y_{split}"] = np.array([label for _, label, _ in entries], np.int64)
                start += len(entries)
            write_cache(cache, {**arrays, "classes": np.array(classes, dtype=str)})
        return Dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], classes=tuple(classes),
                       x_val=arrays.get("x_val"), y_val=arrays.get("y_val"))


def _size(image_size) -> tuple[int, int] | None:
    """None, an int (a square) or [height, width] -> (height, width) or None."""
    if image_size is None:
        return None
    size = [image_size] * 2 if isinstance(image_size, int) and not isinstance(image_size, bool) else image_size
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise DataError(f"image_size: expected a positive integer (a square) or [height, width], got {image_size!r}")
    return int(size[0]), int(size[1])


def _pillow(where: Path):
    try:
        import PIL.Image
    except ImportError:
        raise DataError(f"{where}: reading a folder of images needs Pillow: pip install 'scoretrain[images]'") from None
    return PIL


# ----------------------------------------------------------------------------- the layout


def scan(root: Path) -> tuple[dict[str, list[tuple[str, int, tuple[int, int]]]], list[str]]:
    """Per split present, (relative path, label, (size, mtime_ns)) of every image in ImageFolder's
    order; and train's classes. One DataError line for a layout that cannot be read."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (data.path: a folder of images, or an .npz or HDF5 file)")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: no {split}/ folder (expected {root}/train/<class>/<image> and "
                            f"{root}/test/<class>/<image>, torchvision's ImageFolder layout)")
    classes = class_folders(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'}: no class folders (expected train/<class>/<image>)")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in SPLITS:
        if not (root / split).is_dir():
            continue  # only val can be missing here
        entries = []
        for c in class_folders(root / split):
            if c not in index:
                raise DataError(f"{root / split / c}: a class that train/ lacks (train's classes: {_some(classes)})")
            images = class_images(root, root / split / c)
            entries += [(rel, index[c], stat) for rel, stat in images]
        if not entries:
            raise DataError(f"{root / split}: no class folders with images")
        splits[split] = entries
    return splits, classes


def class_folders(folder: Path) -> list[str]:
    """The class folders' names, sorted: as torchvision's find_classes lists them."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir())
    except OSError as e:
        raise DataError(f"{folder}: cannot list it ({e.strerror or e})") from None


def class_images(root: Path, folder: Path) -> list[tuple[str, tuple[int, int]]]:
    """The images under one class folder in make_dataset's order, each as (path relative to root,
    (size in bytes, mtime in ns))."""
    out, top = [], str(folder)
    prefix = str(folder.relative_to(root))
    try:
        for where, _, names in sorted(os.walk(top, followlinks=True)):
            rel = prefix + where[len(top):]  # os.walk's folders start with `top` (os.path.relpath is slow)
            for name in sorted(names):
                if name.lower().endswith(IMG_EXTENSIONS):
                    st = os.stat(os.path.join(where, name))
                    out.append((f"{rel}/{name}", (st.st_size, st.st_mtime_ns)))
    except OSError as e:
        raise DataError(f"{e.filename or folder}: cannot read it ({e.strerror or e})") from None
    if not out:
        raise DataError(f"{folder}: an empty class (no images: files ending {', '.join(IMG_EXTENSIONS)})")
    return out


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")


# ----------------------------------------------------------------------------- decoding


def decode_all(paths: list[Path], size: tuple[int, int] | None, threads: int) -> np.ndarray:
    """Every image as uint8 [N, H, W, C], in order; C is 3 if any image is colour, else 1. Blocks
    of large images (the first one's pixels, THREADED_PIXELS) are decoded on `threads` threads."""
    out = None
    blocks = [paths[i : i + BLOCK] for i in range(0, len(paths), BLOCK)]
    threads = threads if len(blocks) > 1 and pixels(paths[0]) >= THREADED_PIXELS else 1
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        run = pool.map if pool else map
        i = 0
        for block in run(decode_block, blocks, [size] * len(blocks)):
            for a in block:
                if out is None:
                    out = np.empty((len(paths), *a.shape), np.uint8)
                elif a.shape[:2] != out.shape[1:3]:
                    raise DataError(f"{paths[i]}: {a.shape[0]}x{a.shape[1]} pixels (height x width) where {paths[0]} "
                                    f"is {out.shape[1]}x{out.shape[2]}: give every image one size, or set data.image_size")
                if a.shape[2] > out.shape[3]:  # the first colour image: every image becomes RGB
                    out = np.repeat(out, 3, axis=3)
                out[i] = a  # a grayscale image [H, W, 1] fills every channel of an RGB set: R = G = B
                i += 1
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return out


def pixels(path: Path) -> int:
    """An image's width x height from its header (0 where it cannot be read: decode names it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.width * im.height
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return 0


def decode_block(paths: list[Path], size: tuple[int, int] | None) -> list[np.ndarray]:
    return [decode(p, size) for p in paths]


def decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 [H, W, 1] (grayscale) or [H, W, 3], resized to `size` (height, width)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = "L" if im.getbands()[0] in GRAY_BANDS else "RGB"
            if im.mode != mode:
                im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            a = np.asarray(im)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read it as an image ({type(e).__name__}: {e})") from None
    return a.reshape(a.shape[0], a.shape[1], -1)


# ----------------------------------------------------------------------------- the cache


def cache_file(root: Path, size, files: list[tuple[str, tuple[int, int]]], pillow: str) -> Path:
    """cache_dir()/folders/<folder>-<files>.npz: <folder> digests the folder's path and the image
    size (one cache per folder and size: a new one replaces it), <files> every image's relative
    name, size and mtime, the cache format and Pillow's version."""
    from .datasets import cache_dir

    where = hashlib.sha256(f"{root.resolve()}\0{size}".encode()).hexdigest()[:16]
    h = hashlib.sha256(f"{CACHE_FORMAT}\0{pillow}\0".encode())
    for rel, (nbytes, mtime) in files:
        h.update(f"{rel}\0{nbytes}\0{mtime}\n".encode())
    return cache_dir() / "folders" / f"{where}-{h.hexdigest()[:32]}.npz"


def read_cache(path: Path, counts: dict[str, int]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None where there is no usable cache (then the images are decoded)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # missing, or not a cache this can read: decode again (and replace it)
    if any(len(arrays.get(f"y_{s}", ())) != n or len(arrays.get(f"x_{s}", ())) != n for s, n in counts.items()):
        return None
    return arrays


def write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file beside `path`, rename it into place, then remove the folder's
    older caches. A cache that cannot be written is a note on stderr, not an error."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        print(f"note: the decoded images could not be cached in {path.parent} ({e.strerror or e}); "
              "the next run decodes them again", file=sys.stderr)
        return
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    folder_key = path.name.split("-")[0]
    for old in path.parent.glob(f"{folder_key}-*.npz"):
        if old != path:
            try:
                old.unlink(missing_ok=True)
            except OSError:
                pass  # another user's, or read-only: it does no harm
