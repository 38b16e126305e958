"""Image folders (data.path: DIR in torchvision's ImageFolder layout): order, decoding, resizing,
the cache, and one-line errors. The folders are written here with Pillow."""

import sys

import numpy as np
import pytest
from PIL import Image

from scoretrain.data import datasets, folders, source_for
from scoretrain.data.folders import ImageFolder
from scoretrain.errors import DataError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """The user cache in tmp_path: every test starts with none."""
    monkeypatch.setenv("SCORETRAIN_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache" / "folders"


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def gray(value, h=6, w=5):
    """A grayscale image whose pixels encode `value` (and the position, so a transposition shows)."""
    return (value + np.arange(h * w).reshape(h, w)) % 256


def tree(root, splits):
    """splits: {split: {class: [(name, value), ...]}} -> grayscale PNGs root/split/class/name."""
    for split, classes in splits.items():
        for c, files in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for name, value in files:
                save(root / split / c / name, gray(value))


def which(x):
    """The value each image was written with (its pixel [0, 0])."""
    return [int(v) for v in x[:, 0, 0, 0]]


# ----------------------------------------------------------------------------- layout and order


def test_mnist_as_pngs_loads_to_its_images_and_labels_in_imagefolders_order(tmp_path):
    mnist = datasets.load("mnist")
    n_train, n_test = 300, 100
    for split, x, y in (("train", mnist.x_train[:n_train], mnist.y_train[:n_train]),
                        ("test", mnist.x_test[:n_test], mnist.y_test[:n_test])):
        for i, (img, label) in enumerate(zip(x, y)):
            save(tmp_path / "png" / split / str(label) / f"{i:05d}.png", img[..., 0])
    ds = ImageFolder(tmp_path / "png").load()
    for x, y, got_x, got_y in ((mnist.x_train[:n_train], mnist.y_train[:n_train], ds.x_train, ds.y_train),
                               (mnist.x_test[:n_test], mnist.y_test[:n_test], ds.x_test, ds.y_test)):
        order = np.argsort(y, kind="stable")  # by class, then by file name (= the original index)
        assert got_x.dtype == np.uint8 and got_x.shape == (len(y), 28, 28, 1)
        np.testing.assert_array_equal(got_x, x[order])
        np.testing.assert_array_equal(got_y, y[order])
    assert ds.classes == tuple("0123456789") and ds.x_val is None
    assert ds.digest and ds.info.image_shape == (28, 28, 1)


def test_classes_sort_by_name_and_files_as_make_dataset_walks_them(tmp_path):
    """Classes and files sort as strings ("10" before "2"); a class's own files come before its
    subfolders' (sorted os.walk); any case of a known extension counts; other files do not."""
    tree(tmp_path, {"train": {"b": [("img2.png", 1), ("img10.png", 2), ("X.PNG", 3), ("notes.txt.png", 4)],
                              "10": [("a.png", 5)], "2": [("a.png", 6)]},
                    "test": {"b": [("t.png", 7)]}})
    save(tmp_path / "train" / "b" / "sub" / "deeper" / "0.png", gray(8))
    save(tmp_path / "train" / "b" / "sub" / "z.png", gray(9))
    (tmp_path / "train" / "b" / "readme.txt").write_text("not an image")
    (tmp_path / "train" / "stray.png").write_bytes(b"a file beside the class folders: not in any class")
    ds = ImageFolder(tmp_path).load()
    assert ds.classes == ("10", "2", "b")
    # b: X.PNG < img10 < img2 < notes.txt.png (code-point order), then sub/z.png, then sub/deeper/0.png
    assert which(ds.x_train) == [5, 6, 3, 2, 1, 4, 9, 8]
    assert ds.y_train.tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
    assert ds.y_test.tolist() == [2]  # a test split may lack classes: labels are train's


def test_every_image_extension_torchvision_knows_is_read(tmp_path):
    for i, ext in enumerate(folders.IMG_EXTENSIONS):
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}.get(ext)
        kwargs = {"quality": 100} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
        path = tmp_path / "train" / "c" / f"{i}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), 40 * i % 256, np.uint8)).save(path, fmt, **kwargs)
    save(tmp_path / "test" / "c" / "t.png", np.zeros((4, 4)))
    ds = ImageFolder(tmp_path).load()
    assert len(ds.x_train) == len(folders.IMG_EXTENSIONS) == 9
    assert [int(v) for v in ds.x_train[:, 1, 1, 0]] == [40 * i % 256 for i in range(9)]


def test_an_optional_val_split(tmp_path):
    tree(tmp_path, {"train": {"a": [("1.png", 1)], "b": [("1.png", 2)]}, "test": {"a": [("1.png", 3)]},
                    "val": {"b": [("1.png", 4), ("2.png", 5)]}})
    ds = ImageFolder(tmp_path).load()
    assert which(ds.x_val) == [4, 5] and ds.y_val.tolist() == [1, 1]


def test_source_for_a_folder_is_an_image_folder(tmp_path):
    tree(tmp_path / "mine", {"train": {"a": [("1.png", 1)]}, "test": {"a": [("1.png", 2)]}})
    src = source_for(None, path=str(tmp_path / "mine"), image_size=3)
    assert isinstance(src, ImageFolder) and src.label == "mine" and src.identity == str((tmp_path / "mine").resolve())
    assert src.info().image_shape == (3, 3, 1) and src.info().classes == ("a",)


# ----------------------------------------------------------------------------- modes and sizes


def test_grayscale_stays_one_channel_and_colour_makes_every_image_rgb(tmp_path):
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    save(tmp_path / "train" / "a" / "1.png", g)
    save(tmp_path / "train" / "b" / "2.png", rgb)
    save(tmp_path / "test" / "a" / "3.png", rgba, "RGBA")
    palette = Image.fromarray(g).convert("P")
    palette.save(tmp_path / "test" / "a" / "4.png")
    ds = ImageFolder(tmp_path).load()
    assert ds.x_train.shape == (2, 6, 5, 3) and ds.x_test.shape == (2, 6, 5, 3)
    np.testing.assert_array_equal(ds.x_train[0], np.repeat(g[..., None], 3, axis=2))  # R = G = B
    np.testing.assert_array_equal(ds.x_train[1], rgb)
    np.testing.assert_array_equal(ds.x_test[0], rgba[..., :3])  # alpha dropped
    np.testing.assert_array_equal(ds.x_test[1], np.asarray(palette.convert("RGB")))
    # the same folder without its colour images stays grayscale
    for p in (tmp_path / "train" / "b" / "2.png", tmp_path / "test" / "a" / "3.png", tmp_path / "test" / "a" / "4.png"):
        p.unlink()
    (tmp_path / "train" / "b").rmdir()
    save(tmp_path / "test" / "a" / "5.png", g)
    assert ImageFolder(tmp_path).load().x_train.shape == (1, 6, 5, 1)


@pytest.mark.parametrize("image_size, hw", [(4, (4, 4)), ([3, 7], (3, 7)), ((9, 2), (9, 2))])
def test_image_size_resizes_bilinearly_as_pillow_does(tmp_path, image_size, hw):
    """Every image resized with Image.resize((width, height), BILINEAR), whatever its own size; a
    grayscale image in a colour set is the same as if it had been converted to RGB first."""
    rng = np.random.default_rng(1)
    images = {"train/a/1.png": rng.integers(0, 256, (10, 12), dtype=np.uint8),
              "train/a/2.png": rng.integers(0, 256, (5, 8, 3), dtype=np.uint8),
              "test/a/3.png": rng.integers(0, 256, (7, 7), dtype=np.uint8)}
    for rel, a in images.items():
        save(tmp_path / rel, a)
    ds = ImageFolder(tmp_path, image_size).load()
    h, w = hw
    expected = [np.asarray(Image.fromarray(a).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)) for a in images.values()]
    np.testing.assert_array_equal(ds.x_train, np.stack(expected[:2]))
    np.testing.assert_array_equal(ds.x_test, np.stack(expected[2:]))


def test_decoding_on_threads_gives_the_same_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "BLOCK", 3)  # several blocks, decoded out of order
    monkeypatch.setattr(folders, "THREADED_PIXELS", 0)  # threads for images of any size
    monkeypatch.setattr(folders, "ThreadPoolExecutor", Counting)
    tree(tmp_path, {"train": {c: [(f"{i}.png", 10 * j + i) for i in range(7)] for j, c in enumerate("abc")},
                    "test": {"a": [("1.png", 1)]}})
    one = folders.decode_all(sorted((tmp_path / "train").rglob("*.png")), None, 1)
    four = folders.decode_all(sorted((tmp_path / "train").rglob("*.png")), None, 4)
    np.testing.assert_array_equal(one, four)
    assert which(one) == [10 * j + i for j in range(3) for i in range(7)]
    assert Counting.pools == [4]  # threads=1 made no pool


class Counting(folders.ThreadPoolExecutor):
    pools = []

    def __init__(self, n):
        Counting.pools.append(n)
        super().__init__(n)


# ----------------------------------------------------------------------------- the cache


def small(root):
    tree(root, {"train": {"a": [("1.png", 1), ("2.png", 2)], "b": [("3.png", 3)]}, "test": {"b": [("4.png", 4)]}})


def test_the_second_load_reads_the_cache_without_decoding(tmp_path, cache, monkeypatch):
    small(tmp_path / "d")
    before = sorted(p.relative_to(tmp_path / "d") for p in (tmp_path / "d").rglob("*"))
    first = ImageFolder(tmp_path / "d").load()
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob(".*"))  # no temporary file left
    monkeypatch.setattr(folders, "decode", lambda *a: pytest.fail("decoded again"))
    second = ImageFolder(tmp_path / "d").load()
    for (name, a), (_, b) in zip(first.arrays(), second.arrays()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert second.classes == first.classes and second.digest == first.digest
    assert sorted(p.relative_to(tmp_path / "d") for p in (tmp_path / "d").rglob("*")) == before  # nothing written there


def test_a_changed_file_or_image_size_decodes_again_and_replaces_the_folders_cache(tmp_path, cache):
    small(tmp_path / "d")
    ImageFolder(tmp_path / "d").load()
    old = set(cache.glob("*.npz"))
    save(tmp_path / "d" / "train" / "a" / "2.png", gray(50, 6, 5))  # same name, new bytes and mtime
    ds = ImageFolder(tmp_path / "d").load()
    assert which(ds.x_train) == [1, 50, 3]
    new = set(cache.glob("*.npz"))
    assert len(new) == 1 and new != old  # the stale cache is gone
    assert ImageFolder(tmp_path / "d", 3).load().x_train.shape == (3, 3, 3, 1)
    assert len(list(cache.glob("*.npz"))) == 2  # one per folder and image size
    small(tmp_path / "other")
    ImageFolder(tmp_path / "other").load()
    assert len(list(cache.glob("*.npz"))) == 3  # another folder's cache is its own


def test_a_damaged_cache_is_decoded_again(tmp_path, cache):
    small(tmp_path / "d")
    expected = ImageFolder(tmp_path / "d").load().x_train
    (path,) = cache.glob("*.npz")
    path.write_bytes(b"not an npz")
    np.testing.assert_array_equal(ImageFolder(tmp_path / "d").load().x_train, expected)
    assert np.load(path)["x_train"].shape == expected.shape  # rewritten


def test_an_unwritable_cache_is_a_note_and_the_load_goes_on(tmp_path, monkeypatch, capsys):
    small(tmp_path / "d")
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("SCORETRAIN_DATA", str(tmp_path / "blocked"))
    assert which(ImageFolder(tmp_path / "d").load().x_train) == [1, 2, 3]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not be cached" in err and "the next run decodes them again" in err


# ----------------------------------------------------------------------------- one-line errors


def one_line(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert str(part) in msg, msg


def test_a_missing_split_is_named(tmp_path):
    tree(tmp_path, {"train": {"a": [("1.png", 1)]}})
    with pytest.raises(DataError) as e:
        ImageFolder(tmp_path).load()
    one_line(e, f"{tmp_path}: no test/ folder", "ImageFolder layout")
    with pytest.raises(DataError) as e:
        ImageFolder(tmp_path / "nope").load()
    one_line(e, f"{tmp_path / 'nope'}: no such folder")


def test_an_empty_class_is_named(tmp_path):
    tree(tmp_path, {"train": {"a": [("1.png", 1)]}, "test": {"a": [("1.png", 2)]}})
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "notes.txt").write_text("no images")
    with pytest.raises(DataError) as e:
        ImageFolder(tmp_path).load()
    one_line(e, f"{tmp_path / 'train' / 'b'}: an empty class")


def test_a_class_that_train_lacks_is_named(tmp_path):
    tree(tmp_path, {"train": {"a": [("1.png", 1)]}, "test": {"a": [("1.png", 2)], "zebra": [("1.png", 3)]}})
    with pytest.raises(DataError) as e:
        ImageFolder(tmp_path).load()
    one_line(e, f"{tmp_path / 'test' / 'zebra'}: a class that train/ lacks (train's classes: a)")


def test_an_unreadable_image_is_named(tmp_path, cache):
    small(tmp_path)
    (tmp_path / "train" / "b" / "4.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError) as e:
        ImageFolder(tmp_path).load()
    one_line(e, f"{tmp_path / 'train' / 'b' / '4.png'}: cannot read it as an image")
    assert not cache.exists()  # nothing cached


def test_mixed_sizes_without_a_resize_are_named(tmp_path):
    small(tmp_path)
    save(tmp_path / "train" / "b" / "4.png", gray(1, 7, 5))
    with pytest.raises(DataError) as e:
        ImageFolder(tmp_path).load()
    one_line(e, f"{tmp_path / 'train' / 'b' / '4.png'}: 7x5 pixels (height x width) where "
                f"{tmp_path / 'train' / 'a' / '1.png'} is 6x5", "set data.image_size")
    assert ImageFolder(tmp_path, 5).load().x_train.shape == (4, 5, 5, 1)


@pytest.mark.parametrize("bad", [0, -3, True, [4], [4, 0], "32", 2.5])
def test_a_bad_image_size_is_refused(bad):
    with pytest.raises(DataError, match="image_size: expected a positive integer"):
        ImageFolder("anywhere", bad)


def test_without_pillow_the_error_names_the_extra(tmp_path, monkeypatch):
    small(tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(DataError) as e:
        ImageFolder(tmp_path).load()
    one_line(e, "needs Pillow: pip install 'scoretrain[images]'")
