"""Shared fixtures: a small slice of the real MNIST so end-to-end tests run in seconds, a
sweep of small runs trained once, and a local HTTP server that stands in for a dataset's
download mirrors."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from scoretrain.run import store
from scoretrain.cli import app

# A few hundred real MNIST images: enough for the training loop to learn something.
SMALL = ["data.train_samples=2000", "data.test_samples=500", "train.epochs=2", "model.widths=[784,64,10]",
         "train.batch_size=100", "train.eval_batch_size=200", "device=cpu"]


@pytest.fixture
def small():
    return list(SMALL)


def arrays_digest(run_dir: Path) -> str:
    """SHA-256 of everything run.h5 holds as arrays but the timings and the environment: what a
    run computed, the same for the same run whatever its spec text says."""
    import hashlib

    h = hashlib.sha256()
    with h5py.File(Path(run_dir) / "run.h5", "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and "epoch_seconds" not in name and "environment" not in name:
                h.update(name.encode())
                h.update(np.ascontiguousarray(obj[()]).tobytes())
        f.visititems(visit)
    return h.hexdigest()


def merged(*groups) -> list:
    """Overrides of several lists as one, each key once: a later list's value replaces an earlier
    one's in its place (the command line refuses a key given twice)."""
    out = {}
    for group in groups:
        for o in group:
            key = o.split("=", 1)[0]
            out[key] = o
    return list(out.values())


def for_arch(small_args: list, overrides) -> list:
    """`small_args` fit for `overrides`: an arch other than the mlp takes no model.widths."""
    conv = any(o.startswith("model.arch=") and o != "model.arch=mlp" for o in overrides)
    return [a for a in small_args if not (conv and a.startswith("model.widths="))]


class MirrorHandler(BaseHTTPRequestHandler):
    """The first path segment picks the behaviour: /good/NAME, /corrupt/NAME (the byte
    `server.corrupt_at` from the end flipped), /truncated/NAME (half the promised body, then the
    connection closes), /stall/NAME (half the body, then nothing until `server.release` is set);
    anything else, or a name not in `server.files`, is a 404."""

    def do_GET(self):
        self.server.hits.append(self.path)
        mode, _, name = self.path.strip("/").partition("/")
        body = self.server.files.get(name)
        if body is None or mode not in ("good", "corrupt", "truncated", "stall"):
            self.send_error(404)
            return
        if mode == "corrupt":
            at = len(body) - self.server.corrupt_at
            body = body[:at] + bytes([body[at] ^ 1]) + body[at + 1:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode in ("truncated", "stall") else body)
        if mode == "stall":
            self.wfile.flush()
            self.server.release.wait(60)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror_server():
    """A MirrorHandler server on 127.0.0.1 (a free port). Put what it serves in `.files`
    (name -> bytes); `.corrupt_at` (20) is which byte from the end /corrupt/ flips; `.hits` lists
    the paths asked for; `.url(mode)` is a mirror URL; `.stop()` takes it offline."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    srv.files, srv.hits, srv.corrupt_at, srv.release = {}, [], 20, threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = lambda mode: f"http://127.0.0.1:{srv.server_address[1]}/{mode}/"
    srv.stop = lambda: (srv.shutdown(), srv.server_close())
    yield srv
    srv.release.set()
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
                flags = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))  # the overrides come first
                result = CliRunner().invoke(app, ["fit", FC, *merged(small, args[:flags]), *args[flags:], "--runs-dir", str(folder), "-q"])
                assert result.exit_code == 0, result.output
            _sweeps[key] = folder
        shutil.copytree(_sweeps[key], tmp_path / "runs")
        return tmp_path / "runs"

    return make


# --- real `fit` processes, stopped at exact points ---------------------------------------------

EPOCHS = 4
VARIANTS = {
    "sgd": [],
    "adam": ["train.optimizer=adam", "train.lr=0.01"],
    "dense": ["model.method=dense"],
}
TIMEOUT = 60  # seconds for any one wait; a hang fails the test instead of blocking the suite
runner = CliRunner()

# Runs the real CLI in this process, pausing as $ST_PAUSE says ("epoch N": after epoch N's
# checkpoint; "batch N B": in epoch N, after batch B) until the file $ST_HOOK/go exists.
HOOK = r"""
import os, sys, time
from pathlib import Path
from scoretrain.run import progress
from scoretrain.cli import main

hook, at = Path(os.environ["ST_HOOK"]), os.environ["ST_PAUSE"].split()
R = progress.Reporter
start, batch, end = R.epoch_start, R.batch, R.epoch_end
now = {"epoch": 0}

def pause():
    (hook / "paused").touch()
    while not (hook / "go").exists():
        time.sleep(0.005)

def epoch_start(self, epoch, *a, **k):
    now["epoch"] = epoch
    return start(self, epoch, *a, **k)

def on_batch(self, done, *a, **k):
    batch(self, done, *a, **k)
    if at[0] == "batch" and now["epoch"] == int(at[1]) and done == int(at[2]):
        pause()

def epoch_end(self, row, *a, **k):
    end(self, row, *a, **k)
    if at[0] == "epoch" and row["epoch"] == int(at[1]):
        pause()

R.epoch_start, R.batch, R.epoch_end = epoch_start, on_batch, epoch_end
sys.argv = ["scoretrain", *sys.argv[1:]]
main()
"""


def args_of(small, variant, *extra):
    args = merged(small, [f"train.epochs={EPOCHS}"], VARIANTS[variant], extra)
    return for_arch(args, args)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each variant, made once (in this process) and shared."""
    folder = tmp_path_factory.mktemp("reference")
    made = {}

    def get(variant, *extra):
        if (variant, extra) not in made:
            name = f"{variant}-{len(made)}"
            result = runner.invoke(app, ["fit", FC, *args_of(SMALL, variant, *extra), "--runs-dir", str(folder), "--name", name, "-q"])
            assert result.exit_code == 0, result.output
            made[variant, extra] = folder / name
        return made[variant, extra]

    return get


def assert_identical(run_dir, ref_dir):
    """Bit-identical network, masks, optimizer state and metrics (all but epoch_seconds)."""
    a, b = store.load(run_dir, with_optimizer=True), store.load(ref_dir, with_optimizer=True)
    assert a.attrs["status"] == b.attrs["status"] == "completed"
    assert a.metrics["epoch"] == list(range(1, EPOCHS + 1)), "one metrics row per epoch, no duplicate, no gap"
    for key in store.METRICS:
        assert len(a.metrics[key]) == EPOCHS
        if key != "epoch_seconds":
            np.testing.assert_array_equal(a.metrics[key], b.metrics[key], err_msg=key)  # nan == nan here (mask_change of dense)
    for name in ("weights", "scores", "masks"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        for i, (p, q) in enumerate(zip(x or [], y or [])):
            assert p.dtype == q.dtype and np.array_equal(p, q), f"{name}[{i}] differs"
    assert (a.optimizer["name"], a.optimizer["steps"]) == (b.optimizer["name"], b.optimizer["steps"])
    assert a.optimizer["slots"].keys() == b.optimizer["slots"].keys()
    for slot in a.optimizer["slots"]:
        for i, (p, q) in enumerate(zip(a.optimizer["slots"][slot], b.optimizer["slots"][slot])):
            assert np.array_equal(p, q), f"optimizer {slot}[{i}] differs"
    for key in ("seed", "input_mean", "input_std", "format_version"):
        assert a.attrs[key] == b.attrs[key]


def start(tmp_path, args, pause=None):
    """A `fit` subprocess: the real CLI, paused by HOOK at `pause` if given, else plain `-m scoretrain`."""
    env = dict(os.environ, ST_HOOK=str(tmp_path))
    if pause is None:
        cmd = [sys.executable, "-m", "scoretrain", *args]
    else:
        env["ST_PAUSE"] = pause
        cmd = [sys.executable, "-c", HOOK, *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def epochs_done(run_dir) -> int | None:
    """run.h5's epochs_done as another process sees it (no lock), None while there is none."""
    try:
        with h5py.File(Path(run_dir) / "run.h5", "r", locking=False) as f:
            return int(f.attrs["epochs_done"])
    except (OSError, KeyError):
        return None


def wait_paused(proc, tmp_path, run_dir, epochs):
    """Until the hook has paused the process and run.h5 shows `epochs` finished epochs."""
    deadline = time.monotonic() + TIMEOUT
    while not ((tmp_path / "paused").exists() and epochs_done(run_dir) == epochs):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"fit ended (exit {proc.returncode}) before pausing:\n{out}{err}")
        assert time.monotonic() < deadline, "fit never paused"
        time.sleep(0.005)


def resume(run_dir, *flags):
    result = runner.invoke(app, ["fit", "--resume", str(run_dir), *flags])
    assert result.exit_code == 0, result.output
    return result




def stopped_run(tmp_path, small, *extra, after: int = 1) -> Path:
    """runs/r of fit (the sgd variant with `extra` overrides) stopped by SIGTERM right after the
    checkpoint of epoch `after`, in a real process: an interrupted run to resume."""
    run_dir = tmp_path / "runs" / "r"
    proc = start(tmp_path, ["fit", FC, *args_of(small, "sgd", *extra), "--runs-dir", str(tmp_path / "runs"), "--name", "r"],
                 pause=f"epoch {after}")
    wait_paused(proc, tmp_path, run_dir, after)
    proc.send_signal(signal.SIGTERM)
    (tmp_path / "go").touch()
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    return run_dir
