"""Dataset files: the shipped copy verifies, bad files are refused with a clear message."""

import gzip

import numpy as np
import pytest

from scoretrain.data import datasets as data
from scoretrain.errors import DataError


def test_shipped_mnist_loads_and_matches_its_known_statistics():
    ds = data.load("mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert ds.info == data.Builtin("mnist").info() and ds.info.image_shape == (28, 28, 1) and ds.info.n_classes == 10
    assert np.bincount(ds.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean, std = data.standardization(ds.x_train)
    assert len(mean) == len(std) == 1
    assert abs(mean[0] - 0.1307) < 1e-4 and abs(std[0] - 0.3081) < 1e-4
    x = data.to_float(ds.x_train[:1000], mean, std)
    assert x.dtype == np.float32 and x.shape == (1000, 28, 28, 1)
    # flattening for an MLP after standardizing gives the same numbers as flattening first
    flat = data.to_float(ds.x_train[:1000].reshape(1000, 784), mean, std)
    np.testing.assert_array_equal(x.reshape(1000, 784), flat)


def test_standardization_is_per_channel_and_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    x[..., 1] //= 4  # a darker channel
    mean, std = data.standardization(x)
    ref = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-12)
    assert mean[1] < mean[0] / 2
    out = data.to_float(x, mean, std)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(-1, 3).std(0), 1, atol=1e-5)
    # single floats still apply to every channel (0, 1: no standardization)
    np.testing.assert_array_equal(data.to_float(x, 0.0, 1.0), x.astype(np.float32) / np.float32(255))
    with pytest.raises(ValueError, match="2 means"):
        data.to_float(x, [0.0, 0.0], [1.0, 1.0])


def copy_mnist(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for fn, _ in data.DATASETS["mnist"].files.values():
        (folder / (fn + ".gz")).write_bytes((data.REPO_DATA / "mnist" / (fn + ".gz")).read_bytes())
    return folder


def test_uncompressed_and_gz_files_both_verify(tmp_path):
    folder = copy_mnist(tmp_path)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    (folder / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(labels.read_bytes()))
    labels.unlink()
    assert len(data.load("mnist", str(tmp_path)).y_test) == 10000


def test_corrupt_file_fails_its_checksum(tmp_path):
    folder = copy_mnist(tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] ^= 1
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        data.load("mnist", str(tmp_path))


def test_truncated_gzip_is_refused(tmp_path):
    folder = copy_mnist(tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="cannot read"):
        data.load("mnist", str(tmp_path))


def test_idx_parser_checks_the_header_and_length(tmp_path):
    good = b"\0\0\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03"
    np.testing.assert_array_equal(data.parse_idx(good, tmp_path), [1, 2, 3])
    with pytest.raises(DataError, match="truncated"):
        data.parse_idx(good[:-1], tmp_path)
    with pytest.raises(DataError, match="not a uint8 IDX"):
        data.parse_idx(b"PK\x03\x04", tmp_path)


def test_empty_folder_names_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=f"files not found in {tmp_path}/mnist"):
        data.load("mnist", str(tmp_path))
