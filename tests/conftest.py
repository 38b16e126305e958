"""Shared fixtures: a small slice of the real MNIST so end-to-end tests run in seconds, a
sweep of small runs trained once, and a local HTTP server that stands in for a dataset's
download mirrors."""

import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# A few hundred real MNIST images: enough for the training loop to learn something.
SMALL = ["data.train_samples=2000", "data.test_samples=500", "train.epochs=2", "model.widths=[784,64,10]",
         "train.batch_size=100", "train.eval_batch_size=200", "device=cpu"]


@pytest.fixture
def small():
    return list(SMALL)


class MirrorHandler(BaseHTTPRequestHandler):
    """The first path segment picks the behaviour: /good/NAME, /corrupt/NAME (the byte
    `server.corrupt_at` from the end flipped), /truncated/NAME (half the promised body, then the
    connection closes); anything else, or a name not in `server.files`, is a 404."""

    def do_GET(self):
        self.server.hits.append(self.path)
        mode, _, name = self.path.strip("/").partition("/")
        body = self.server.files.get(name)
        if body is None or mode not in ("good", "corrupt", "truncated"):
            self.send_error(404)
            return
        if mode == "corrupt":
            at = len(body) - self.server.corrupt_at
            body = body[:at] + bytes([body[at] ^ 1]) + body[at + 1:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "truncated" else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror_server():
    """A MirrorHandler server on 127.0.0.1 (a free port). Put what it serves in `.files`
    (name -> bytes); `.corrupt_at` (20) is which byte from the end /corrupt/ flips; `.hits` lists
    the paths asked for; `.url(mode)` is a mirror URL; `.stop()` takes it offline."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    srv.files, srv.hits, srv.corrupt_at = {}, [], 20
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = lambda mode: f"http://127.0.0.1:{srv.server_address[1]}/{mode}/"
    srv.stop = lambda: (srv.shutdown(), srv.server_close())
    yield srv
    if thread.is_alive():
        srv.stop()


FC = str(Path(__file__).resolve().parent.parent / "configs/mnist_fc.yaml")
_sweeps = {}  # (name, runs) -> the folder it was trained in, once a session


@pytest.fixture
def sweep(small, tmp_path_factory, tmp_path):
    """sweep(name, runs): a folder of runs trained with `scoretrain fit` on configs/mnist_fc.yaml
    and the small MNIST slice, one run for each list of extra arguments in `runs`. Each sweep
    is trained once; every test gets its own copy (tmp_path/runs) to break."""
    from typer.testing import CliRunner

    from scoretrain.cli import app

    def make(name: str, runs: list[list[str]]) -> Path:
        key = (name, tuple(map(tuple, runs)))
        if key not in _sweeps:
            folder = tmp_path_factory.mktemp(name)
            for args in runs:
                result = CliRunner().invoke(app, ["fit", FC, *small, *args, "--runs-dir", str(folder), "-q"])
                assert result.exit_code == 0, result.output
            _sweeps[key] = folder
        shutil.copytree(_sweeps[key], tmp_path / "runs")
        return tmp_path / "runs"

    return make
