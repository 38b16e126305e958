"""CIFAR-10 (the python version) and augmentation.

The archives are built here in the real format (a .tar.gz of pickled batches, CHW pixel rows),
tiny (20 images a batch), and served from a local HTTP server on 127.0.0.1 (mirror_server in
conftest.py) whose first path segment picks its behaviour: /good/, /corrupt/ (one byte
flipped), /truncated/ (half the promised body, then the connection closes), anything else 404.
"""

import dataclasses
import gzip
import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from typer.testing import CliRunner

from scoretrain.data import datasets as data
from scoretrain.cli import app
from scoretrain.errors import DataError
from scoretrain.kernels import conv_engine
from scoretrain.run import store

NAME, ARCHIVE = "cifar10", "cifar-10-python.tar.gz"
N = 20  # images per batch


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def batch(rng, label0: int) -> dict:
    """One batch as the real files hold it: a dict with bytes keys, data uint8 [n, 3072] (per
    image all red, then green, then blue pixels, each plane 32x32 row-major) and labels a list."""
    return {
        b"batch_label": b"fixture",
        b"labels": [(label0 + i) % 10 for i in range(N)],
        b"data": rng.integers(0, 256, (N, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(N)],
    }


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    out = {f"data_batch_{i}": batch(rng, i) for i in range(1, 6)}
    out["test_batch"] = batch(rng, 7)
    # image 0 of data_batch_1 is structured: red = row, green = column, blue = 200 - row
    plane = np.indices((32, 32))
    out["data_batch_1"][b"data"][0] = np.concatenate([plane[0].ravel(), plane[1].ravel(), 200 - plane[0].ravel()])
    return out


def add(tar: tarfile.TarFile, name: str, body: bytes = b"", **kind) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    for k, v in kind.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(body))


def archive(batches: dict, drop: str | None = None, extra=()) -> bytes:
    """A cifar-10-python.tar.gz of `batches` (less `drop`), plus `extra` (name, body, kind) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        add(tar, "cifar-10-batches-py", type=tarfile.DIRTYPE)
        add(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
        add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2))
        for name, d in batches.items():
            if name != drop:
                add(tar, f"cifar-10-batches-py/{name}", pickle.dumps(d, protocol=2))
        for name, body, kind in extra:
            add(tar, name, body, **kind)
    return buf.getvalue()


def expected(batches: dict, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The images [n, 32, 32, 3] and labels, by explicit index arithmetic (no reshape/transpose)."""
    flat = np.concatenate([batches[n][b"data"] for n in names])
    i, r, c, ch = np.indices((len(flat), 32, 32, 3))
    return flat[i, ch * 1024 + r * 32 + c], np.concatenate([batches[n][b"labels"] for n in names])


@pytest.fixture
def serve(mirror_server, monkeypatch, tmp_path):
    """serve(body, *modes): put `body` on the server as the archive, point the mirrors at it in
    the given modes, and set the spec's checksum to the body's. The cache is in tmp_path."""
    srv = mirror_server
    srv.corrupt_at = 100
    monkeypatch.setenv("SCORETRAIN_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "REPO_DATA", tmp_path / "repo")

    def serve(body: bytes, *modes: str):
        srv.files[ARCHIVE] = body
        spec = dataclasses.replace(data.DATASETS[NAME], files={"archive": ("cifar-10-python.tar", data.Sha256(None, sha(body)))},
                                   mirrors=())
        monkeypatch.setitem(data.DATASETS, NAME, spec)
        monkeypatch.setenv("SCORETRAIN_MIRRORS", ",".join(srv.url(m) for m in modes))
        return srv

    return serve


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache" / NAME


# ----------------------------------------------------------------------------- download and load


def test_registry():
    spec = data.DATASETS[NAME]
    assert (spec.image_shape, len(spec.classes), spec.format) == ((32, 32, 3), 10, "cifar10")
    assert data.Builtin(NAME).info().image_shape == (32, 32, 3)
    assert data.DATASETS[NAME].mirrors == ("https://www.cs.toronto.edu/~kriz/",)
    (fn, sums), = data.DATASETS[NAME].files.values()
    assert fn + ".gz" == ARCHIVE and sums.raw is None and len(sums.gz) == 64


def test_download_verify_and_load_then_offline(serve, cache, batches):
    body = archive(batches)
    srv = serve(body, "good")
    ds = data.load(NAME)
    train = [f"data_batch_{i}" for i in range(1, 6)]
    x_train, y_train = expected(batches, train)
    x_test, y_test = expected(batches, ["test_batch"])
    assert ds.x_train.shape == (5 * N, 32, 32, 3) and ds.x_test.shape == (N, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert ds.x_train.flags["C_CONTIGUOUS"] and ds.x_test.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert sorted(p.name for p in cache.iterdir()) == [ARCHIVE]  # kept as downloaded, nothing extracted
    assert (cache / ARCHIVE).read_bytes() == body
    srv.stop()  # offline from here on
    np.testing.assert_array_equal(data.load(NAME).x_test, x_test)
    assert len(srv.hits) == 1


def test_channels_rows_and_columns_land_where_they_belong(serve, batches):
    serve(archive(batches), "good")
    img = data.load(NAME).x_train[0]  # red = row, green = column, blue = 200 - row
    rows, cols = np.indices((32, 32))
    np.testing.assert_array_equal(img[..., 0], rows)
    np.testing.assert_array_equal(img[..., 1], cols)
    np.testing.assert_array_equal(img[..., 2], 200 - rows)
    assert img[3, 17].tolist() == [3, 17, 197]


def test_standardization_and_to_float_on_cifar(serve, batches):
    serve(archive(batches), "good")
    ds = data.load(NAME)
    mean, std = data.standardization(ds.x_train)
    assert len(mean) == len(std) == 3
    x = data.to_float(ds.x_test, mean, std)
    assert x.shape == (N, 32, 32, 3) and x.dtype == np.float32
    ref = (ds.x_test / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


def test_fetch_reports_and_then_verifies_the_cached_archive(serve, cache, batches):
    srv = serve(archive(batches), "missing", "good")
    folder, report = data.fetch(NAME)
    assert folder == cache and report == [(cache / ARCHIVE, f"downloaded from {srv.url('good')}{ARCHIVE}, verified")]
    srv.stop()
    assert data.fetch(NAME)[1] == [(cache / ARCHIVE, "present, verified")]


def test_corrupt_first_mirror_falls_back_to_the_second(serve, cache, batches):
    srv = serve(archive(batches), "corrupt", "good")
    assert len(data.load(NAME).y_test) == N
    assert [h.split("/")[1] for h in srv.hits] == ["corrupt", "good"]
    assert sorted(p.name for p in cache.iterdir()) == [ARCHIVE]


@pytest.mark.parametrize("modes", [("corrupt",), ("truncated",), ("truncated", "corrupt")])
def test_a_bad_download_is_refused_in_one_line_and_leaves_nothing(serve, cache, batches, modes):
    serve(archive(batches), *modes)
    with pytest.raises(DataError) as e:
        data.load(NAME)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"dataset {NAME}: could not download {ARCHIVE} from any mirror (")
    assert ("truncated" in msg) == ("truncated" in modes) and ("SHA-256 mismatch" in msg) == ("corrupt" in modes)
    assert not cache.parent.exists()  # no partial file, no temp file, nothing extracted, no folder


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_archive_on_disk_is_refused_in_one_line(serve, tmp_path, batches, damage):
    body = archive(batches)
    serve(body, "good")
    folder = tmp_path / "root" / NAME
    folder.mkdir(parents=True)
    bad = body[: len(body) // 2] if damage == "truncated" else body[:-100] + bytes([body[-100] ^ 1]) + body[-99:]
    (folder / ARCHIVE).write_bytes(bad)
    with pytest.raises(DataError, match="SHA-256 mismatch") as e:
        data.load(NAME, str(tmp_path / "root"))
    assert "\n" not in str(e.value) and str(folder / ARCHIVE) in str(e.value)
    assert sorted(p.name for p in folder.iterdir()) == [ARCHIVE]  # refused, never replaced behind the user's back


def test_an_uncompressed_tar_cannot_be_verified(serve, tmp_path, batches):
    body = archive(batches)
    serve(body, "good")
    folder = tmp_path / "root" / NAME
    folder.mkdir(parents=True)
    (folder / "cifar-10-python.tar").write_bytes(gzip.decompress(body))
    with pytest.raises(DataError, match="cannot verify an uncompressed copy"):
        data.load(NAME, str(tmp_path / "root"))


def test_only_the_expected_members_are_read_and_nothing_is_extracted(serve, tmp_path, batches):
    """Hostile extra entries (path traversal, absolute paths, links) in a verified archive are
    never touched: the batches are read by name into memory."""
    evil = [
        ("../../escaped.txt", b"x", {}),
        (str(tmp_path / "absolute.txt"), b"x", {}),
        ("cifar-10-batches-py/link", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
    ]
    serve(archive(batches, extra=evil), "good")
    assert len(data.load(NAME).y_train) == 5 * N
    assert not (tmp_path / "absolute.txt").exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [ARCHIVE]


@pytest.mark.parametrize("case, message", [
    ("missing batch", "cifar-10-batches-py/data_batch_3 is missing from the archive"),
    ("batch is a link", "cifar-10-batches-py/data_batch_3 in the archive is not a regular file"),
    ("not a batch", "cifar-10-batches-py/data_batch_3 is not a CIFAR-10 batch"),
    ("wrong width", "cifar-10-batches-py/data_batch_3 is not a CIFAR-10 batch"),
    ("bad label", "train labels outside 0..9"),
    ("not a tar", "not a readable tar archive"),
])
def test_a_verified_archive_that_is_not_cifar_is_refused_in_one_line(serve, cache, batches, case, message):
    """The checksum is set to each bad archive, as for a wrong registry entry: still a DataError."""
    bad = dict(batches)
    link = ("cifar-10-batches-py/data_batch_3", b"", {"type": tarfile.SYMTYPE, "linkname": "data_batch_1"})
    if case == "wrong width":
        bad["data_batch_3"] = {**bad["data_batch_3"], b"data": np.zeros((N, 1024), np.uint8)}
    elif case == "bad label":
        bad["data_batch_3"] = {**bad["data_batch_3"], b"labels": [10] * N}
    elif case == "not a batch":
        bad["data_batch_3"] = [1, 2, 3]
    body = {
        "missing batch": lambda: archive(bad, drop="data_batch_3"),
        "batch is a link": lambda: archive(bad, drop="data_batch_3", extra=[link]),
        "not a tar": lambda: gzip.compress(b"not a tar at all" * 100, mtime=0),
    }.get(case, lambda: archive(bad))()
    serve(body, "good")
    with pytest.raises(DataError, match=message) as e:
        data.load(NAME)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- augmentation


def images(b=16, h=6, w=9, c=2, seed=0):
    """Float images with every pixel distinct and non-zero (so padding zeros can't hide a mistake);
    H != W so that swapped axes would show."""
    return (np.random.default_rng(seed).permutation(b * h * w * c) + 1).astype(np.float32).reshape(b, h, w, c)


def reference(x, rng, padding, flip):
    """The documented contract, one image at a time."""
    b, h, w, _ = x.shape
    offsets = rng.integers(0, 2 * padding + 1, size=(b, 2)) if padding else np.zeros((b, 2), int)
    flips = rng.integers(0, 2, size=b) if flip else np.zeros(b, int)
    out = np.empty_like(x)
    for i in range(b):
        padded = np.pad(x[i], ((padding, padding), (padding, padding), (0, 0)))
        dy, dx = offsets[i]
        crop = padded[dy : dy + h, dx : dx + w]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out, offsets, flips


def test_no_padding_and_no_flip_is_the_identity_and_draws_nothing():
    x = images()
    rng = np.random.default_rng(1)
    assert data.augment(np, x, rng, 0, False) is x
    assert rng.bit_generator.state == np.random.default_rng(1).bit_generator.state


@pytest.mark.parametrize("padding, flip", [(0, True), (2, False), (2, True), (4, True)])
def test_augment_matches_the_per_image_reference(padding, flip):
    x = images(b=64)
    out = data.augment(np, x, np.random.default_rng(5), padding, flip)
    ref, offsets, flips = reference(x, np.random.default_rng(5), padding, flip)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, ref)
    assert np.array_equal(x, images(b=64))  # the input is not modified
    if flip:
        assert 0 < flips.sum() < len(flips)  # both kinds of image were checked
    if padding:
        assert offsets.min() == 0 and offsets.max() == 2 * padding  # so were both extreme crops


def test_a_flip_reverses_the_width_axis_exactly():
    x = images(b=32)
    out = data.augment(np, x, np.random.default_rng(3), 0, True)
    flipped = np.array([not np.array_equal(o, i) for o, i in zip(out, x)])
    assert 0 < flipped.sum() < len(x)
    np.testing.assert_array_equal(out[flipped], x[flipped][:, :, ::-1, :])
    np.testing.assert_array_equal(out[~flipped], x[~flipped])


def test_a_crop_is_a_window_of_the_zero_padded_image():
    x = images(b=200, h=32, w=32, c=3)
    out = data.augment(np, x, np.random.default_rng(4), 4, False)
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(len(x)):  # find each output among the 81 windows of its padded image
        hits = [(dy, dx) for dy in range(9) for dx in range(9) if np.array_equal(out[i], padded[i, dy : dy + 32, dx : dx + 32])]
        assert len(hits) == 1
    assert (out == 0).any()  # some crops reach into the padding


def test_same_seed_same_augmentation_and_the_draws_are_as_documented():
    x = images(b=50)
    a = data.augment(np, x, np.random.default_rng(9), 3, True)
    b = data.augment(np, x, np.random.default_rng(9), 3, True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data.augment(np, x, np.random.default_rng(10), 3, True))
    # exactly B*2 crop offsets then B flip bits are drawn, so the caller's stream continues predictably
    rng, twin = np.random.default_rng(9), np.random.default_rng(9)
    data.augment(np, x, rng, 3, True)
    twin.integers(0, 7, size=(50, 2)), twin.integers(0, 2, size=50)
    assert rng.bit_generator.state == twin.bit_generator.state


def test_augment_refuses_a_flat_batch():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        data.augment(np, np.zeros((4, 784), np.float32), np.random.default_rng(0), 4, True)


def cupy_or_skip():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:
        pass
    pytest.skip("no CuPy with a CUDA device")


@pytest.mark.gpu
def test_cupy_and_numpy_give_identical_augmentations():
    cp = cupy_or_skip()
    x = images(b=128, h=32, w=32, c=3)
    host = data.augment(np, x, np.random.default_rng(7), 4, True)
    dev = data.augment(cp, cp.asarray(x), np.random.default_rng(7), 4, True)
    assert isinstance(dev, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(dev), host)


def test_an_explicit_root_without_the_archive_names_it(tmp_path):
    with pytest.raises(DataError, match=rf"files not found in {tmp_path}/{NAME} \(expected cifar-10-python\.tar\.gz\)$"):
        data.load(NAME, str(tmp_path))


# ----------------------------------------------------------------------------- the shipped configs

@pytest.mark.parametrize("engine", ["auto", "im2col"])
@pytest.mark.parametrize("arch", ["conv2", "conv6", "conv8", "resnet18"])
def test_shipped_cifar_config_trains_end_to_end_on_fixture_data(serve, batches, tmp_path, arch, engine):
    """configs/cifar10_convN.yaml through `fit` (download, verify, augment, train, checkpoint)
    and `eval`, on the fixture archive and a thin net, on each conv engine (auto: torch where
    PyTorch is installed): the smoke run of the CIFAR-10 path."""
    serve(archive(batches), "good")
    config = Path(__file__).resolve().parent.parent / "configs" / f"cifar10_{arch}.yaml"
    runner = CliRunner()
    args = ["fit", str(config), "model.width=0.0625", "train.epochs=2", "train.batch_size=25", "device=cpu",
            f"train.conv_engine={engine}", "--runs-dir", str(tmp_path / "runs"), "--name", "smoke"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(runner.invoke(app, ["eval", str(tmp_path / "runs" / "smoke"), "--json"]).output)
    assert out["epochs"] == 2 and out["matches_record"] is True and out["masks_match_scores"] is True
    assert out["test_samples"] == N
    recorded = store.environments(store.load(tmp_path / "runs" / "smoke"))[0]["conv_engine"]
    assert recorded == (conv_engine.resolve(engine, np).describe())
