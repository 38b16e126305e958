"""Datasets as sources (source.py): the built-in ones (datasets.py: files, download,
verification, parsing), a user's arrays (arrays.py) and image folders (folders.py); and the
preparation a run applies (datasets.py: validation split, standardization, augmentation)."""

from __future__ import annotations

from pathlib import Path


def source_for(name: str | None, root: str | None = None, path: str | None = None,
               keys: dict | None = None, image_size: list | None = None):
    """The source the spec's data section names: a built-in dataset by `name`, or `path`: an
    .npz/HDF5 file of arrays or a folder of class folders of images."""
    if path is None:
        from .datasets import Builtin, spec_of

        spec_of(name)  # a DataError for an unknown name
        return Builtin(name, root)
    from ..errors import DataError

    if isinstance(image_size, int):
        image_size = [image_size, image_size]
    if Path(path).is_dir():
        if keys:
            raise DataError(f"data.keys: applies to an .npz or HDF5 file, but data.path {path} is a folder of images")
        from .folders import ImageFolder

        return ImageFolder(path, image_size)
    if image_size is not None:
        raise DataError(f"data.image_size: applies to a folder of images, but data.path {path} is a file (resize the arrays yourself)")
    from .arrays import ArrayFile

    return ArrayFile(path, keys)
