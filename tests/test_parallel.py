"""Several `fit` processes on one runs folder at once: a sweep run with `xargs -P`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from typer.testing import CliRunner

from conftest import merged

from scoretrain.run import store
from scoretrain.cli import app

ROOT = Path(__file__).resolve().parent.parent
FC = str(ROOT / "configs/mnist_fc.yaml")
TIMEOUT = 60
runner = CliRunner()


def start(cwd, *args):
    return subprocess.Popen([sys.executable, "-m", "scoretrain", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs):
    """Wait for all; [(exit code, stdout, stderr)] in order."""
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_complete(run_dir: Path, epochs: int, seed: int, pid: int | None = None):
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "run.h5"]  # no temporary files
    run = store.load(run_dir, with_optimizer=True)
    assert run.attrs["status"] == "completed" and run.epochs_done == epochs
    assert run.metrics["epoch"] == list(range(1, epochs + 1))
    assert run.attrs["seed"] == seed and f"seed: {seed}\n" in (run_dir / "config.yaml").read_text()
    if pid is not None:
        assert run.attrs["pid"] == pid  # written by that process alone
    return run


def test_four_fits_into_one_runs_folder_make_four_distinct_complete_runs(tmp_path, small):
    runs = tmp_path / "runs"  # created by the racing processes themselves
    procs = [start(tmp_path, "fit", FC, *merged(small, ["train.epochs=3"]), f"seed={seed}", "--runs-dir", str(runs), "-q")
             for seed in range(4)]
    results = finish(procs)
    assert [code for code, _, _ in results] == [0, 0, 0, 0], results
    assert all(err == "" for _, _, err in results)
    folders = sorted(runs.iterdir())
    assert len(folders) == 4 and all(f.name.startswith("edge-popup-k0.5-") for f in folders)
    by_seed = {store.load(f).attrs["seed"]: f for f in folders}
    assert sorted(by_seed) == [0, 1, 2, 3]
    for seed, proc in enumerate(procs):
        assert_complete(by_seed[seed], 3, seed, proc.pid)
    # a run trained next to three others is the run trained alone
    alone = runner.invoke(app, ["fit", FC, *merged(small, ["train.epochs=3", "seed=2"]), "--runs-dir", str(tmp_path / "alone"), "--name", "x", "-q"])
    assert alone.exit_code == 0, alone.output
    a, b = store.load(by_seed[2]), store.load(tmp_path / "alone" / "x")
    assert all(np.array_equal(x, y) for x, y in zip(a.scores + a.masks, b.scores + b.masks))
    assert a.metrics["test_loss"] == b.metrics["test_loss"]


def test_one_name_asked_by_four_processes_gives_one_run_and_three_refusals(tmp_path, small):
    runs = tmp_path / "runs"
    args = [*merged(small, ["train.epochs=2"]), "--runs-dir", str(runs), "--name", "same", "-q"]
    procs = [start(tmp_path, "fit", FC, *args, f"seed={seed}") for seed in range(4)]
    results = finish(procs)
    codes = [code for code, _, _ in results]
    assert sorted(codes) == [0, 1, 1, 1], results
    refusal = f"error: {runs / 'same'}: a run with this name already exists (choose another --name, or --resume it)"
    for code, out, err in results:
        if code == 1:
            assert out == "" and err.splitlines() == [refusal]
    winner = codes.index(0)
    assert [p.name for p in runs.iterdir()] == ["same"]
    assert_complete(runs / "same", 2, winner, procs[winner].pid)
    # later askers are refused the same way and leave the winner's files byte for byte
    before = files_of(runs)
    for result in finish([start(tmp_path, "fit", FC, *args, "seed=9") for _ in range(2)]):
        assert result == (1, "", refusal + "\n")
    assert files_of(runs) == before


def test_two_resumes_of_one_run_at_once_train_it_once(tmp_path, small):
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "r"
    proc = start(tmp_path, "fit", FC, *merged(small, ["train.epochs=12"]), "--runs-dir", str(runs), "--name", "r", "-q")
    deadline = time.monotonic() + TIMEOUT
    while True:  # SIGKILL once an epoch is checkpointed
        try:
            with h5py.File(run_dir / "run.h5", "r", locking=False) as f:
                if f.attrs["epochs_done"] >= 1:
                    break
        except (OSError, KeyError):
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "fit ended before it could be killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert store.live_status(store.load(run_dir)) == "interrupted"
    results = finish([start(tmp_path, "fit", "--resume", str(run_dir), "-q") for _ in range(2)])
    assert sorted(code for code, _, _ in results) == [0, 1], results
    _, out, err = next(r for r in results if r[0] == 1)
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: {run_dir}: ")
    assert "another process is training this run" in err or "already completed" in err
    assert_complete(run_dir, 12, 0)


def test_readers_see_a_whole_run_file_at_every_moment_of_training(tmp_path, small):
    run_dir = tmp_path / "runs" / "r"
    proc = start(tmp_path, "fit", FC, *merged(small, ["train.epochs=10"]), "--runs-dir", str(tmp_path / "runs"), "--name", "r", "-q")
    seen = set()
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None:
        if (run_dir / "run.h5").exists():
            run = store.load(run_dir, with_optimizer=True)  # raises on a partial file
            assert run.metrics["epoch"] == list(range(1, run.epochs_done + 1))
            assert run.attrs["status"] in ("running", "completed")
            seen.add(run.epochs_done)
        assert time.monotonic() < deadline
    assert proc.wait() == 0
    assert len(seen) >= 2  # it really read the file while it was being rewritten
    assert_complete(run_dir, 10, 0, proc.pid)
