"""Downloading datasets, against a local HTTP server on 127.0.0.1 that serves tiny IDX files.

The server (mirror_server in conftest.py) takes its behaviour from the first path segment:
/good/, /corrupt/ (one byte flipped), /truncated/ (half the promised body, then the connection
closes), anything else 404.
"""

import gzip
import hashlib

import numpy as np
import pytest
from conftest import merged
from typer.testing import CliRunner

from scoretrain.data import datasets as data
from scoretrain.cli import app
from scoretrain.errors import DataError

NAME = "fashion-mnist"  # not shipped with the repo, so it must come over the network


def idx(a: np.ndarray) -> bytes:
    return b"\0\0\x08" + bytes([a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape) + a.tobytes()


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(20, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(10, dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def files(arrays):
    """name.gz -> the served bytes (gzip with mtime 0: the same bytes every run)."""
    return {fn + ".gz": gzip.compress(idx(a), mtime=0) for fn, a in arrays.items()}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def server(mirror_server, files):
    mirror_server.files = files
    return mirror_server


@pytest.fixture
def cache(tmp_path, monkeypatch, files):
    """The user cache in tmp_path, no repo copy, and the spec's .gz checksums set to the fixtures'."""
    monkeypatch.setenv("SCORETRAIN_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "REPO_DATA", tmp_path / "repo")
    spec = data.DATASETS[NAME]
    fake = {part: (fn, data.Sha256(None, sha(files[fn + ".gz"]))) for part, (fn, _) in spec.files.items()}
    monkeypatch.setitem(data.DATASETS, NAME, data.DatasetSpec(NAME, fake, ("http://127.0.0.1:9/never-used/",)))
    return tmp_path / "cache" / NAME


def mirrors(monkeypatch, server, *modes):
    monkeypatch.setenv("SCORETRAIN_MIRRORS", ",".join(server.url(m) for m in modes))


def check_arrays(ds, arrays):
    np.testing.assert_array_equal(ds.x_train, arrays["train-images-idx3-ubyte"].reshape(20, 28, 28, 1))
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.x_test, arrays["t10k-images-idx3-ubyte"].reshape(10, 28, 28, 1))
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_download_then_load_offline_from_the_cache(cache, server, monkeypatch, arrays, files):
    mirrors(monkeypatch, server, "good")
    check_arrays(data.load(NAME), arrays)
    assert sorted(p.name for p in cache.iterdir()) == sorted(files)
    assert all((cache / fn).read_bytes() == body for fn, body in files.items())
    server.stop()  # offline from here on
    check_arrays(data.load(NAME), arrays)
    assert len(server.hits) == 4


def test_corrupt_first_mirror_falls_back_to_the_second(cache, server, monkeypatch, arrays):
    mirrors(monkeypatch, server, "corrupt", "good")
    check_arrays(data.load(NAME), arrays)
    assert [h.split("/")[1] for h in server.hits] == ["corrupt", "good"] * 4
    assert not list(cache.glob("*.part"))


def test_truncated_body_falls_back_to_the_next_mirror(cache, server, monkeypatch, arrays):
    mirrors(monkeypatch, server, "truncated", "good")
    check_arrays(data.load(NAME), arrays)
    assert [h.split("/")[1] for h in server.hits] == ["truncated", "good"] * 4


@pytest.mark.parametrize("modes", [("missing", "gone"), ("truncated", "corrupt")])
def test_failure_on_every_mirror_is_one_line_and_leaves_nothing(cache, server, monkeypatch, modes):
    mirrors(monkeypatch, server, *modes)
    with pytest.raises(DataError) as e:
        data.load(NAME)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"dataset {NAME}: could not download train-images-idx3-ubyte.gz from any mirror (")
    assert f"{server.url(modes[0])}train-images-idx3-ubyte.gz: " in msg and server.url(modes[1]) in msg
    if modes[0] == "missing":
        assert "HTTP 404" in msg
    else:
        assert "truncated" in msg and "SHA-256 mismatch" in msg
    assert not cache.exists() and not cache.parent.exists()  # no partial file, no temp file, no folder


def test_uncompressed_checksum_alone_verifies_a_download(cache, server, monkeypatch, arrays):
    """As for MNIST: a file also verifies by the SHA-256 of its decompressed bytes."""
    spec = data.DATASETS[NAME]
    files = {part: (fn, data.Sha256(sha(idx(arrays[fn])), "0" * 64)) for part, (fn, _) in spec.files.items()}
    monkeypatch.setitem(data.DATASETS, NAME, data.DatasetSpec(NAME, files, ()))
    mirrors(monkeypatch, server, "good")
    check_arrays(data.load(NAME), arrays)


def test_explicit_root_never_downloads(cache, server, monkeypatch, tmp_path):
    mirrors(monkeypatch, server, "good")
    with pytest.raises(DataError, match=f"files not found in {tmp_path}/elsewhere/{NAME}"):
        data.load(NAME, str(tmp_path / "elsewhere"))
    assert server.hits == [] and not cache.exists()


def test_a_corrupt_cached_file_is_refused_and_fetch_replaces_it(cache, server, monkeypatch, arrays, files):
    mirrors(monkeypatch, server, "good")
    data.load(NAME)
    bad = cache / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"junk")
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        data.load(NAME)
    data.fetch(NAME)
    assert bad.read_bytes() == files[bad.name]
    check_arrays(data.load(NAME), arrays)


def test_data_fetch_command(cache, server, monkeypatch, tmp_path):
    runner = CliRunner()
    mirrors(monkeypatch, server, "missing", "good")
    result = runner.invoke(app, ["data", "fetch", NAME])
    assert result.exit_code == 0, result.output
    assert str(cache) in result.output
    assert result.output.count(f"downloaded from {server.url('good')}") == 4
    server.stop()
    result = runner.invoke(app, ["data", "fetch", NAME])
    assert result.exit_code == 0 and result.output.count("present, verified") == 4
    result = runner.invoke(app, ["data", "list"])
    assert result.exit_code == 0 and str(cache) in result.output
    result = runner.invoke(app, ["data", "fetch", NAME, "--root", str(tmp_path / "r")])  # offline: fails
    assert result.exit_code == 1 and "could not download" in result.output
    assert not (tmp_path / "r").exists()  # a failed fetch leaves no folder it made
    result = runner.invoke(app, ["data", "fetch", "nope"])
    assert result.exit_code == 1 and "unknown" in result.output


def test_fit_downloads_a_missing_dataset(cache, server, monkeypatch, tmp_path, small):
    mirrors(monkeypatch, server, "good")
    config = tmp_path / "f.yaml"
    config.write_text(f"data: {{name: {NAME}}}\n")
    args = merged([a for a in small if not a.startswith("data.")], ["train.batch_size=10", "train.epochs=1"])
    result = CliRunner().invoke(app, ["fit", str(config), *args, "--runs-dir", str(tmp_path / "runs"), "--name", "f"])
    assert result.exit_code == 0, result.output
    assert len(server.hits) == 4 and (cache / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.parametrize("terminal", [True, False])
def test_a_download_shows_bytes_rate_and_time_left_on_a_terminal_only(mirror_server, tmp_path, terminal):
    import io
    import re

    from rich.console import Console

    from scoretrain.data.datasets import DownloadBar

    mirror_server.files["blob.gz"] = bytes(range(256)) * 12_000  # 3.1 MB: several chunks
    out = io.StringIO()
    bar = DownloadBar(Console(file=out, force_terminal=terminal, width=120))
    data.http_get(mirror_server.url("good") + "blob.gz", tmp_path / "blob.gz", bar)
    bar.stop()
    assert (tmp_path / "blob.gz").read_bytes() == mirror_server.files["blob.gz"]
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # without the terminal's escape codes
    if terminal:
        assert "blob.gz" in shown and "3.1/3.1 MB" in shown and re.search(r"[\d.]+ [kMG]B/s", shown) and "0:00:00" in shown
    else:
        assert shown == ""  # a log gets the `downloading URL` line alone
