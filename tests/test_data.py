"""Dataset files: the shipped copy verifies, bad files are refused with a clear message."""

import gzip

import numpy as np
import pytest

from scoretrain import data
from scoretrain.errors import DataError


def test_shipped_mnist_loads_and_matches_its_known_statistics():
    ds = data.load("mnist")
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert np.bincount(ds.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean, std = data.standardization(ds.x_train)
    assert abs(mean - 0.1307) < 1e-4 and abs(std - 0.3081) < 1e-4
    x = data.to_float(ds.x_train[:1000], mean, std)
    assert x.dtype == np.float32


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
