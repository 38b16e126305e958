"""CIFAR-100 (the python version) and SVHN (cropped digits, MATLAB files served uncompressed).

The files are built here in the real formats, tiny, and served from a local HTTP server on
127.0.0.1 (mirror_server in conftest.py) whose first path segment picks its behaviour: /good/,
/corrupt/ (one byte flipped), /truncated/ (half the promised body), anything else 404. The
spec's checksums are set to the fixtures' (the published ones are for the real files).
"""

import dataclasses
import gzip
import hashlib
import io
import pickle
import sys
import tarfile

import numpy as np
import pytest
import scipy.io
from typer.testing import CliRunner

from scoretrain.cli import app
from scoretrain.data import datasets as data
from scoretrain.errors import DataError

CIFAR100 = data.DATASETS["cifar100"]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def serve(mirror_server, monkeypatch, tmp_path):
    """serve(name, {file name without .gz: body}, *modes): put the bodies on the server under the
    names the spec serves them as, point the mirrors at it in the given modes, and set the spec's
    checksums to the bodies' (of the .gz where the spec has one, else of the file). The cache is
    tmp_path/cache, with no repo copy."""
    monkeypatch.setenv("SCORETRAIN_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "REPO_DATA", tmp_path / "repo")

    def serve(name, bodies, *modes):
        spec, files = data.DATASETS[name], {}
        for part, (fn, sums) in spec.files.items():
            files[part] = (fn, data.Sha256(None, sha(bodies[fn])) if sums.gz else data.Sha256(sha(bodies[fn]), None))
            mirror_server.files[data.served_name(fn, sums)] = bodies[fn]
        monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(spec, files=files, mirrors=()))
        monkeypatch.setenv("SCORETRAIN_MIRRORS", ",".join(mirror_server.url(m) for m in modes))
        return mirror_server

    return serve


def one_line(e, *parts):
    msg = str(e.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert str(part) in msg, msg


# ----------------------------------------------------------------------------- the registry


def test_the_registry_entries():
    cifar, svhn = data.DATASETS["cifar100"], data.DATASETS["svhn"]
    assert (cifar.image_shape, len(cifar.classes), cifar.format) == ((32, 32, 3), 100, "cifar100")
    assert cifar.classes[:3] == ("apple", "aquarium_fish", "baby") and cifar.classes[-1] == "worm"
    assert cifar.mirrors == ("https://www.cs.toronto.edu/~kriz/",)
    (fn, sums), = cifar.files.values()
    assert data.served_name(fn, sums) == "cifar-100-python.tar.gz" and sums.raw is None
    assert sums.gz == "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
    assert (svhn.image_shape, svhn.classes, svhn.format) == ((32, 32, 3), tuple("0123456789"), "svhn")
    assert svhn.mirrors == ("http://ufldl.stanford.edu/housenumbers/",)
    assert {fn: (data.served_name(fn, s), s) for fn, s in svhn.files.values()} == {
        "train_32x32.mat": ("train_32x32.mat", ("435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8", None)),
        "test_32x32.mat": ("test_32x32.mat", ("cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b", None)),
    }
    assert data.Builtin("svhn").info().n_classes == 10 and data.Builtin("cifar100").info().n_classes == 100


# ----------------------------------------------------------------------------- CIFAR-100


def cifar_split(rng, n, labels):
    return {b"filenames": [b"f%d.png" % i for i in range(n)], b"batch_label": b"fixture", b"fine_labels": labels,
            b"coarse_labels": [l // 5 for l in labels], b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    train = [99, 0, *rng.integers(0, 100, 28).tolist()]
    return {"train": cifar_split(rng, 30, train), "test": cifar_split(rng, 10, rng.integers(0, 100, 10).tolist())}


def cifar_archive(splits, names=CIFAR100.classes, drop=None, replace=None) -> bytes:
    """A cifar-100-python.tar.gz: cifar-100-python/{train, test, meta} as the real archive holds them."""
    members = {**{s: pickle.dumps(d, protocol=2) for s, d in splits.items()},
               "meta": pickle.dumps({b"fine_label_names": [n.encode() for n in names],
                                     b"coarse_label_names": [b"c%d" % i for i in range(20)]}, protocol=2),
               **(replace or {})}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in members.items():
            if name != drop:
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def cifar_expected(d):
    """Images [n, 32, 32, 3] by explicit index arithmetic (each row is 1024 red, 1024 green, 1024 blue)."""
    i, r, c, ch = np.indices((len(d[b"data"]), 32, 32, 3))
    return d[b"data"][i, ch * 1024 + r * 32 + c], np.array(d[b"fine_labels"])


def test_cifar100_downloads_verifies_and_loads_then_works_offline(serve, splits, tmp_path):
    body = cifar_archive(splits)
    srv = serve("cifar100", {"cifar-100-python.tar": body}, "good")
    ds = data.load("cifar100")
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        ex, ey = cifar_expected(splits[split])
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)  # the fine labels, not the coarse ones
    assert ds.x_train.flags["C_CONTIGUOUS"] and ds.y_train.dtype == np.int64 and ds.classes == CIFAR100.classes
    cache = tmp_path / "cache" / "cifar100"
    assert [p.name for p in cache.iterdir()] == ["cifar-100-python.tar.gz"]  # kept as downloaded
    srv.stop()
    np.testing.assert_array_equal(data.load("cifar100").y_test, splits["test"][b"fine_labels"])
    assert srv.hits == [f"/good/cifar-100-python.tar.gz"]


@pytest.mark.parametrize("case, message", [
    ("other class names", "the files name 100 classes (pear, aquarium_fish, baby, …), not the 100 expected (apple, aquarium_fish, baby, …)"),
    ("no meta", "cifar-100-python/meta is missing from the archive"),
    ("meta without names", "cifar-100-python/meta holds no class names (KeyError"),
    ("no test", "cifar-100-python/test is missing from the archive"),
    ("not a batch", "cifar-100-python/train is not a CIFAR-100 batch (TypeError"),
    ("coarse labels only", "cifar-100-python/train is not a CIFAR-100 batch (KeyError"),
    ("label 100", "train labels outside 0..99"),
])
def test_a_verified_archive_that_is_not_cifar100_is_one_line(serve, splits, case, message):
    names = list(CIFAR100.classes)
    train = splits["train"]
    body = {
        "other class names": lambda: cifar_archive(splits, ["pear"] + names[1:]),
        "no meta": lambda: cifar_archive(splits, drop="meta"),
        "meta without names": lambda: cifar_archive(splits, replace={"meta": pickle.dumps({b"label_names": []})}),
        "no test": lambda: cifar_archive(splits, drop="test"),
        "not a batch": lambda: cifar_archive(splits, replace={"train": pickle.dumps([1, 2])}),
        "coarse labels only": lambda: cifar_archive(splits, replace={"train": pickle.dumps({k: v for k, v in train.items() if k != b"fine_labels"})}),
        "label 100": lambda: cifar_archive(splits, replace={"train": pickle.dumps({**train, b"fine_labels": [100] * 30})}),
    }[case]()
    serve("cifar100", {"cifar-100-python.tar": body}, "good")
    with pytest.raises(DataError) as e:
        data.load("cifar100")
    one_line(e, message)


# ----------------------------------------------------------------------------- SVHN


def mat(x: np.ndarray, y: np.ndarray) -> bytes:
    """A MATLAB v5 file as SVHN's: X [32, 32, 3, N] uint8, y [N, 1]."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"X": x, "y": y})
    return buf.getvalue()


@pytest.fixture(scope="module")
def svhn():
    rng = np.random.default_rng(1)
    x_train, x_test = rng.integers(0, 256, (32, 32, 3, 25), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3, 12), dtype=np.uint8)
    y_train = np.array([10, 1, 9, *rng.integers(1, 11, 22)], np.uint8).reshape(-1, 1)
    y_test = rng.integers(1, 11, (12, 1)).astype(np.float64)  # whatever numeric type the file has
    return {"arrays": (x_train, y_train, x_test, y_test),
            "files": {"train_32x32.mat": mat(x_train, y_train), "test_32x32.mat": mat(x_test, y_test)}}


def svhn_expected(x, y):
    n, r, c, ch = np.indices((x.shape[3], 32, 32, 3))
    return x[r, c, ch, n], y.reshape(-1).astype(np.int64) % 10


def test_svhn_downloads_uncompressed_verifies_and_loads_then_works_offline(serve, svhn, tmp_path):
    srv = serve("svhn", svhn["files"], "good")
    ds = data.load("svhn")
    x_train, y_train, x_test, y_test = svhn["arrays"]
    ex, ey = svhn_expected(x_train, y_train)
    np.testing.assert_array_equal(ds.x_train, ex)
    np.testing.assert_array_equal(ds.y_train, ey)
    assert ds.y_train[:3].tolist() == [0, 1, 9]  # label 10 is the digit 0
    ex, ey = svhn_expected(x_test, y_test)
    np.testing.assert_array_equal(ds.x_test, ex)
    np.testing.assert_array_equal(ds.y_test, ey)
    assert ds.x_train.shape == (25, 32, 32, 3) and ds.x_train.flags["C_CONTIGUOUS"] and ds.classes == tuple("0123456789")
    assert srv.hits == ["/good/train_32x32.mat", "/good/test_32x32.mat"]  # served as is, not as .gz
    cache = tmp_path / "cache" / "svhn"
    assert sorted(p.name for p in cache.iterdir()) == ["test_32x32.mat", "train_32x32.mat"]
    srv.stop()
    np.testing.assert_array_equal(data.load("svhn").y_test, ey)


def test_svhn_falls_back_from_a_corrupt_or_truncated_mirror(serve, svhn):
    srv = serve("svhn", svhn["files"], "corrupt", "truncated", "good")
    assert len(data.load("svhn").y_train) == 25
    assert [h.split("/")[1] for h in srv.hits] == ["corrupt", "truncated", "good"] * 2


def test_a_locally_compressed_svhn_file_verifies_by_its_uncompressed_checksum(serve, svhn, tmp_path):
    serve("svhn", svhn["files"], "good")
    root = tmp_path / "root" / "svhn"
    root.mkdir(parents=True)
    (root / "train_32x32.mat.gz").write_bytes(gzip.compress(svhn["files"]["train_32x32.mat"], mtime=0))
    (root / "test_32x32.mat").write_bytes(svhn["files"]["test_32x32.mat"])
    assert len(data.load("svhn", str(tmp_path / "root")).y_train) == 25
    (root / "test_32x32.mat").write_bytes(svhn["files"]["train_32x32.mat"])  # the wrong file
    with pytest.raises(DataError) as e:
        data.load("svhn", str(tmp_path / "root"))
    one_line(e, f"{root / 'test_32x32.mat'}: SHA-256 mismatch", "the file is corrupt or not test_32x32.mat")


@pytest.mark.parametrize("case, message", [
    ("not a .mat", "train_32x32.mat: not an SVHN .mat file ("),
    ("no X", "train_32x32.mat: not an SVHN .mat file (KeyError: 'X')"),
    ("grayscale", "not an SVHN .mat file (X uint8 [32, 32, 1, 4], y [4, 1]; expected X uint8 [32, 32, 3, N] and y [N, 1])"),
    ("label 0", "train_32x32.mat: labels outside 1..10"),
    ("label 11", "train_32x32.mat: labels outside 1..10"),
])
def test_a_verified_file_that_is_not_svhn_is_one_line(serve, svhn, case, message):
    x, y = np.zeros((32, 32, 3, 4), np.uint8), np.ones((4, 1), np.uint8)
    train = {
        "not a .mat": lambda: b"MATLAB? no" * 50,
        "no X": lambda: (lambda b: (scipy.io.savemat(b, {"images": x, "y": y}), b.getvalue())[1])(io.BytesIO()),
        "grayscale": lambda: mat(x[:, :, :1], y),
        "label 0": lambda: mat(x, y * 0),
        "label 11": lambda: mat(x, y * 11),
    }[case]()
    serve("svhn", {**svhn["files"], "train_32x32.mat": train}, "good")
    with pytest.raises(DataError) as e:
        data.load("svhn")
    one_line(e, message)


def test_without_scipy_svhn_is_refused_before_any_download(serve, svhn, monkeypatch, tmp_path):
    srv = serve("svhn", svhn["files"], "good")
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(DataError) as e:
        data.load("svhn")
    one_line(e, "dataset svhn: reading its files needs scipy: pip install 'scoretrain[svhn]'")
    assert srv.hits == [] and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- failed fetches, the CLI


def test_a_fetch_that_fails_part_way_leaves_nothing_behind(serve, svhn, mirror_server, tmp_path):
    serve("svhn", svhn["files"], "good")
    del mirror_server.files["test_32x32.mat"]  # the train file downloads, the test file is a 404
    with pytest.raises(DataError) as e:
        data.fetch("svhn")
    one_line(e, "dataset svhn: could not download test_32x32.mat from any mirror (", "HTTP 404")
    assert [h.split("/")[-1] for h in mirror_server.hits] == ["train_32x32.mat", "test_32x32.mat"]
    assert not (tmp_path / "cache").exists()  # neither the downloaded file nor the folders it made


def test_a_failed_fetch_keeps_what_was_there(serve, svhn, mirror_server, tmp_path):
    serve("svhn", svhn["files"], "good")
    folder = tmp_path / "cache" / "svhn"
    folder.mkdir(parents=True)
    (folder / "train_32x32.mat").write_bytes(svhn["files"]["train_32x32.mat"])
    mirror_server.files.clear()
    with pytest.raises(DataError, match="could not download test_32x32.mat"):
        data.fetch("svhn")
    assert [p.name for p in folder.iterdir()] == ["train_32x32.mat"]


def test_data_list_and_fetch_show_the_new_datasets(serve, svhn, splits, tmp_path):
    runner = CliRunner()
    serve("cifar100", {"cifar-100-python.tar": cifar_archive(splits)}, "good")
    srv = serve("svhn", svhn["files"], "missing", "good")
    out = runner.invoke(app, ["data", "list"]).output
    assert "cifar100       not downloaded (scoretrain data fetch cifar100)" in out
    assert "svhn           not downloaded (scoretrain data fetch svhn)" in out
    result = runner.invoke(app, ["data", "fetch", "svhn"])
    assert result.exit_code == 0, result.output
    cache = tmp_path / "cache" / "svhn"
    assert f"svhn: {cache}" in result.output
    assert result.output.count(f"downloaded from {srv.url('good')}") == 2 and "train_32x32.mat" in result.output
    assert f"svhn           {cache}" in runner.invoke(app, ["data", "list"]).output
    assert "cifar100" in runner.invoke(app, ["data", "fetch", "--help"]).output
    srv.stop()
    result = runner.invoke(app, ["data", "fetch", "cifar100", "--root", str(tmp_path / "r")])  # offline
    assert result.exit_code == 1 and "could not download cifar-100-python.tar.gz" in result.output
    assert not (tmp_path / "r").exists()
