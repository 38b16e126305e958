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
import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import EPOCHS, FC, TIMEOUT, VARIANTS, args_of, assert_identical, merged, resume, start, wait_paused
from scoretrain.run import store
from scoretrain.cli import app
from scoretrain.run.config import ModelConfig
from scoretrain.nn.model import init_network

runner = CliRunner()


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


SLICE = 0.01  # seconds a stopped fit runs between two looks at it


def run_until_killed(proc, run_dir, target: int, extra: int) -> bool:
    """Let `proc` run in slices of SLICE seconds, each ended by SIGSTOP, until run.h5 shows it
    checkpointed `target` epochs (or, for target < 0, until its run folder exists) and then
    `extra` slices more; then SIGKILL it while it is stopped, wherever it stopped: in training,
    evaluation or a checkpoint write. It is killed early once it works on its last epoch, so
    a kill always lands before the run completes unless an epoch takes less than a slice.
    Returns False if the process ended by itself first."""
    reached = False
    while True:
        time.sleep(SLICE)
        os.kill(proc.pid, signal.SIGSTOP)
        if proc.poll() is not None:
            return False
        now = progress_of(run_dir, proc.pid)
        if not reached:
            reached = now is not None and now >= target or target < 0 and (run_dir / "config.yaml").exists()
        elif extra == 0 or (now or 0) >= EPOCHS - 1:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
            return True
        else:
            extra -= 1
        os.kill(proc.pid, signal.SIGCONT)


def test_sigkill_at_random_moments_always_leaves_a_loadable_run_that_resumes_to_the_same_end(tmp_path, small, reference):
    """Plain `python -m scoretrain` (no hook) killed with SIGKILL at random moments of its work:
    before its first checkpoint, in training, evaluation or a checkpoint write. Each kill waits
    for a random epoch to be checkpointed by the process, then a random number of short slices
    of its running time more (run_until_killed: stopped between slices, so the kill cannot
    come too late however fast or loaded the machine is). Every time run.h5 loads whole (or
    there is none yet and --resume starts the run over); in the end the run resumes to the
    uninterrupted one, bit for bit."""
    more = ("data.train_samples=20000",)  # epochs long enough for a kill to land inside one
    rng = random.Random(2)
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "r"
    stopped_at, finished_first = [], 0
    while len(stopped_at) < 5:
        done = store.load(run_dir).epochs_done if (run_dir / "run.h5").exists() else 0
        if done > EPOCHS - 2:
            break
        fresh = not run_dir.exists()
        args = ["fit", FC, *args_of(small, "sgd", *more), "--runs-dir", str(runs), "--name", "r"] if fresh else ["fit", "--resume", str(run_dir)]
        proc = start(tmp_path, [*args, "-q"])
        if not run_until_killed(proc, run_dir, target=rng.randint(done - 1, EPOCHS - 2), extra=rng.randint(0, 60)):
            out, err = proc.communicate(timeout=TIMEOUT)  # an epoch shorter than a slice: start over
            assert proc.returncode == 0 and store.load(run_dir).attrs["status"] == "completed", out + err
            finished_first += 1
            assert finished_first < 3, "fit finished its last epoch within one slice, three times"
            shutil.rmtree(run_dir)
            stopped_at.clear()
            continue
        proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == -signal.SIGKILL
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
    args = [*merged(small, ["train.epochs=3"]), f"model.method={method}", "train.lr=1e6"]
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


def test_a_run_records_its_libraries_and_a_resume_on_others_says_so(tmp_path, small):
    """run.h5 names what each session trained on (numpy, numba, llvmlite, the BLAS with its kernel
    and threads, the CPU, scoretrain and its commit); eval --json and inspect show it; a resume
    on other libraries says so in one line, and records its own from the epoch it trains next."""
    import json

    import numba

    from conftest import stopped_run

    run_dir = stopped_run(tmp_path, small)
    envs = store.environments(store.load(run_dir))
    assert len(envs) == 1 and envs[0]["from_epoch"] == 1
    assert envs[0]["numpy"] == np.__version__ and envs[0]["numba"] == numba.__version__
    assert "thread" in envs[0]["blas"] and envs[0]["cpu"] and envs[0]["cupy"] is None
    with h5py.File(run_dir / "run.h5", "r+") as f:  # as if trained on an older NumPy
        f.attrs["environments"] = json.dumps([dict(envs[0], numpy="1.26.4")])
    result = runner.invoke(app, ["fit", "--resume", str(run_dir), "-q"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"numpy 1.26.4 -> {np.__version__}" in notes[0] and "epochs 2.." in notes[0]
    envs = store.environments(store.load(run_dir))
    assert [e["from_epoch"] for e in envs] == [1, 2] and envs[1]["numpy"] == np.__version__
    shown = json.loads(runner.invoke(app, ["eval", str(run_dir), "--json"]).stdout)
    assert shown["environments"] == envs
    lines = runner.invoke(app, ["inspect", str(run_dir)]).stdout.splitlines()
    assert sum(line.startswith("epochs 1..: scoretrain") for line in lines) == 1
    assert any(line.startswith("epochs 2..: ") and f"numpy {np.__version__}" in line for line in lines)


def test_a_resume_on_the_same_libraries_says_nothing(tmp_path, small):
    from conftest import stopped_run

    run_dir = stopped_run(tmp_path, small)
    result = runner.invoke(app, ["fit", "--resume", str(run_dir), "-q"])
    assert result.exit_code == 0 and "note:" not in result.stderr
    assert len(store.environments(store.load(run_dir))) == 2
