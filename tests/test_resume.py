"""Resume, signals, SIGKILL and divergence, with real processes.

A run that is stopped (SIGINT, SIGTERM or SIGKILL) and resumed with `fit --resume` must end
bit-identical to the uninterrupted run of the same seed: weights, scores, masks, optimizer
state and every metric but epoch_seconds.

To stop a process at an exact point without racing it, the subprocess runs the real CLI
(`scoretrain.cli.main`, with its own signal handling) behind a small hook that pauses it in
the progress display: after the checkpoint of epoch N, or inside epoch N after batch B. The
test waits for the pause (and for run.h5 to show the finished epochs, read with
locking=False), sends its signal and, for SIGINT/SIGTERM, lets the process go on. The random
SIGKILL test runs the plain `python -m scoretrain` with no hook at all.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from scoretrain import store
from scoretrain.cli import app
from scoretrain.config import ModelConfig
from scoretrain.model import init_network

ROOT = Path(__file__).resolve().parent.parent
FC = str(ROOT / "configs/mnist_fc.yaml")
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
from scoretrain import progress
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
    return [*small, f"train.epochs={EPOCHS}", *VARIANTS[variant], *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each variant, made once (in this process) and shared."""
    from conftest import SMALL

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


def same_state(a: store.Run, b: store.Run) -> bool:
    arrays = lambda r: (r.weights + (r.scores or []) + (r.masks or [])  # noqa: E731
                        + [x for slot in sorted((r.optimizer or {"slots": {}})["slots"]) for x in r.optimizer["slots"][slot]])
    same_metrics = a.metrics.keys() == b.metrics.keys() and all(
        np.array_equal(a.metrics[k], b.metrics[k], equal_nan=True) for k in a.metrics)  # mask_change is nan for dense
    return (same_metrics and (a.optimizer or {}).get("steps") == (b.optimizer or {}).get("steps")
            and len(arrays(a)) == len(arrays(b)) and all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b))))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigkill_then_sigint_in_the_resumed_epoch_then_resume_is_bit_identical(tmp_path, small, variant, reference):
    """SIGKILL right after epoch 1's checkpoint; a resume interrupted by SIGINT in the middle of
    its first epoch keeps epoch 1 exactly as it was; a second resume completes the run."""
    run_dir = tmp_path / "runs" / "r"
    proc = start(tmp_path, ["fit", FC, *args_of(small, variant), "--runs-dir", str(tmp_path / "runs"), "--name", "r"], pause="epoch 1")
    wait_paused(proc, tmp_path, run_dir, 1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    killed = store.load(run_dir, with_optimizer=True)
    assert killed.epochs_done == 1 and killed.attrs["status"] == "running"  # as it was written ...
    assert store.live_status(killed) == "interrupted"  # ... but its process is gone
    if variant == "sgd":
        result = runner.invoke(app, ["eval", str(run_dir), "--json"])
        assert result.exit_code == 0 and '"status": "interrupted"' in result.stdout and '"epochs": 1' in result.stdout

    (tmp_path / "paused").unlink()
    proc = start(tmp_path, ["fit", "--resume", str(run_dir)], pause="batch 2 3")
    wait_paused(proc, tmp_path, run_dir, 1)  # resumed, three batches of epoch 2 trained
    proc.send_signal(signal.SIGINT)
    (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    assert "resuming after epoch 1" in out
    assert err.splitlines() == [f"interrupted after epoch 1; resume with: scoretrain fit --resume {run_dir}"]
    stopped = store.load(run_dir, with_optimizer=True)
    assert stopped.attrs["status"] == "interrupted" and stopped.attrs["message"] == "stopped by SIGINT"
    assert same_state(stopped, killed)  # epoch 1 as checkpointed: none of the three batches

    result = resume(run_dir)
    assert f"fit {run_dir}: " in result.stdout and "resuming after epoch 1" in result.stdout
    assert "epoch 1/4" not in result.stdout and "epoch 2/4" in result.stdout
    assert_identical(run_dir, reference(variant))
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "run.h5"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigint_in_the_first_epoch_keeps_the_initial_network_and_resumes_exactly(tmp_path, small, variant, reference):
    run_dir = tmp_path / "runs" / "r"
    proc = start(tmp_path, ["fit", FC, *args_of(small, variant), "--runs-dir", str(tmp_path / "runs"), "--name", "r"], pause="batch 1 3")
    wait_paused(proc, tmp_path, run_dir, 0)  # three batches of epoch 1 trained
    proc.send_signal(signal.SIGINT)
    (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    assert err.splitlines() == [f"interrupted after epoch 0; resume with: scoretrain fit --resume {run_dir}"]
    assert "Traceback" not in out + err
    run = store.load(run_dir, with_optimizer=True)
    assert run.attrs["status"] == "interrupted" and run.attrs["message"] == "stopped by SIGINT"
    assert run.epochs_done == 0 and run.optimizer is None
    method = "dense" if variant == "dense" else "edge-popup"
    weights, scores = init_network(ModelConfig(method=method, widths=[784, 64, 10]), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(run.weights + (run.scores or []), weights + (scores or [])))
    resume(run_dir)
    assert_identical(run_dir, reference(variant))


def test_sigterm_between_epochs_keeps_both_epochs_and_resumes_exactly(tmp_path, small, reference):
    run_dir = tmp_path / "runs" / "r"
    proc = start(tmp_path, ["fit", FC, *args_of(small, "adam"), "--runs-dir", str(tmp_path / "runs"), "--name", "r"], pause="epoch 2")
    wait_paused(proc, tmp_path, run_dir, 2)  # epoch 2 checkpointed, epoch 3 not started
    proc.send_signal(signal.SIGTERM)
    (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, err
    assert err.splitlines() == [f"interrupted after epoch 2; resume with: scoretrain fit --resume {run_dir}"]
    run = store.load(run_dir, with_optimizer=True)
    assert run.attrs["status"] == "interrupted" and run.attrs["message"] == "stopped by SIGTERM"
    assert run.epochs_done == 2 and run.optimizer["steps"] == 40  # no batch of epoch 3 was trained
    # eval reports the stopped run as it is; resuming is refused with a config, and works without
    result = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 0 and '"status": "interrupted"' in result.stdout and '"epochs": 2' in result.stdout
    resume(run_dir)
    assert_identical(run_dir, reference("adam"))


def progress_of(run_dir, pid) -> int | None:
    """Epochs done in run.h5 if process `pid` wrote it (it is working on the run), else None."""
    try:
        with h5py.File(Path(run_dir) / "run.h5", "r", locking=False) as f:
            return int(f.attrs["epochs_done"]) if int(f.attrs["pid"]) == pid else None
    except (OSError, KeyError):
        return None


def test_sigkill_at_random_moments_always_leaves_a_loadable_run_that_resumes_to_the_same_end(tmp_path, small, reference):
    """Plain `python -m scoretrain` (no hook) killed with SIGKILL at random moments of its work:
    before its first checkpoint, in training, evaluation or a checkpoint write. Each kill
    waits for a random epoch to be checkpointed by the process, then a random part of an
    epoch more, so it lands before the run completes however fast the machine. Every time
    run.h5 loads whole (or there is none yet and --resume starts the run over); in the end
    the run resumes to the uninterrupted one, bit for bit."""
    more = ("data.train_samples=20000",)  # epochs long enough for a kill to land inside one
    ref = store.load(reference("sgd", *more))
    epoch = sum(ref.metrics["epoch_seconds"]) / EPOCHS  # training steps only: a real epoch is longer
    rng = random.Random(2)
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "r"
    stopped_at = []
    for kill in range(5):
        done = store.load(run_dir).epochs_done if (run_dir / "run.h5").exists() else 0
        if done > EPOCHS - 2:
            break
        fresh = not run_dir.exists()
        args = ["fit", FC, *args_of(small, "sgd", *more), "--runs-dir", str(runs), "--name", "r"] if fresh else ["fit", "--resume", str(run_dir)]
        proc = start(tmp_path, [*args, "-q"])
        target = rng.randint(done - 1, EPOCHS - 2)  # done - 1: as soon as the process works on the run
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None:
            now = progress_of(run_dir, proc.pid)
            if now is not None and now >= target or target < 0 and (run_dir / "config.yaml").exists():
                break
            assert time.monotonic() < deadline, "fit never reached its target epoch"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 1.2 * epoch))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == -signal.SIGKILL, f"fit was not killed (exit {proc.returncode}): {out}{err}"
        if (run_dir / "run.h5").exists():
            run = store.load(run_dir, with_optimizer=True)  # never a partial file
            assert run.attrs["status"] == "running" and store.live_status(run) == "interrupted"
            assert run.metrics["epoch"] == list(range(1, run.epochs_done + 1))
            assert run.epochs_done >= done
            stopped_at.append(run.epochs_done)
        else:
            stopped_at.append(None)  # killed before the first checkpoint: --resume starts it over
    assert len(stopped_at) >= 2
    result = runner.invoke(app, ["eval", str(run_dir), "--json"])  # eval of a killed run
    if stopped_at[-1] is not None:
        assert result.exit_code == 0 and '"status": "interrupted"' in result.stdout, result.output
    resume(run_dir)
    assert_identical(run_dir, reference("sgd", *more))
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "run.h5"]  # stale .tmp files removed


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(tmp_path, small, reference):
    """The window between the run folder's mkdir and its first run.h5: config.yaml only."""
    run_dir = tmp_path / "runs" / "sgd"
    run_dir.parent.mkdir()
    (run_dir).mkdir()
    (run_dir / "config.yaml").write_bytes((reference("sgd") / "config.yaml").read_bytes())
    (run_dir / ".run.h5.999999999.tmp").write_bytes(b"half a checkpoint")  # no such pid
    result = runner.invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 1 and "before its first checkpoint" in result.output
    assert "scoretrain fit --resume" in result.output and len(result.output.splitlines()) == 1
    resume(run_dir)
    assert_identical(run_dir, reference("sgd"))
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "run.h5"]


@pytest.mark.parametrize("method", ["edge-popup", "dense"])
def test_divergence_fails_the_run_in_one_line_and_keeps_the_last_good_epoch(tmp_path, small, method):
    """lr=1e6 really diverges: dense weights overflow (the loss becomes nan); edge-popup's loss
    stays finite (the mask only picks weights) but its scores overflow to inf/nan."""
    args = [*small, "train.epochs=3", f"model.method={method}", "train.lr=1e6"]
    result = runner.invoke(app, ["fit", FC, *args, "--runs-dir", str(tmp_path), "--name", "d", "-q"])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'd'}: "), result.stderr
    assert "learning rate 1e+06" in lines[0] and "epoch 1" in lines[0] and "run marked failed, epoch 0 kept" in lines[0]
    assert ("nan" in lines[0]) and "Warning" not in result.stderr
    run = store.load(tmp_path / "d", with_optimizer=True)
    assert run.attrs["status"] == "failed" and "learning rate" in run.attrs["message"]
    assert run.epochs_done == 0 and run.optimizer is None
    # the kept network is the last good one (here the initial one), not the diverged arrays
    weights, scores = init_network(ModelConfig(method=method, widths=[784, 64, 10]), seed=0)
    for a, b in zip(run.weights + (run.scores or []), weights + (scores or [])):
        assert np.array_equal(a, b)
    result = runner.invoke(app, ["eval", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 0 and '"status": "failed"' in result.stdout
