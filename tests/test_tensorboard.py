"""train.tensorboard: each epoch's scalars as TensorBoard event files in RUN_DIR/tensorboard,
read back here with TensorBoard's own reader (EventAccumulator): the values run.h5 records, one
step per epoch, across a resume too."""

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FC, resume, stopped_run
from scoretrain.run import store
from scoretrain.cli import app

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="TensorBoard's reader (pip install tensorboard)")
pytest.importorskip("tensorboardX", reason="pip install 'scoretrain[tensorboard]'")
runner = CliRunner()


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_each_epochs_scalars_are_what_run_h5_records(tmp_path, small):
    result = runner.invoke(app, ["fit", FC, *small, "data.val_samples=200", "train.tensorboard=true", "--runs-dir", str(tmp_path),
                                 "--name", "r", "-q"])
    assert result.exit_code == 0, result.output
    run = store.load(tmp_path / "r")
    got = scalars(tmp_path / "r")
    assert set(got) == {"loss/train", "loss/test", "loss/val", "accuracy/train", "accuracy/test", "accuracy/val", "lr",
                        "mask_change/total", "epoch_seconds", "k", "mask_change/layer_00", "mask_change/layer_01"}
    for tag, key in (("loss/train", "train_loss"), ("accuracy/test", "test_acc"), ("accuracy/val", "val_acc"), ("lr", "lr")):
        assert [s for s, _ in got[tag]] == [1, 2]
        np.testing.assert_array_equal([v for _, v in got[tag]], np.float32(run.metrics[key]))  # TensorBoard keeps float32
    np.testing.assert_array_equal([v for _, v in got["mask_change/layer_01"]], np.float32([row[1] for row in run.mask_change_layers]))
    assert [v for _, v in got["k"]] == [pytest.approx(0.5)] * 2


def test_a_resumed_run_goes_on_from_its_epoch(tmp_path, small):
    run_dir = stopped_run(tmp_path, small, "train.tensorboard=true")
    assert [s for s, _ in scalars(run_dir)["accuracy/test"]] == [1]
    resume(run_dir, "-q")
    run = store.load(run_dir)
    got = scalars(run_dir)["accuracy/test"]
    assert [s for s, _ in got] == list(range(1, run.epochs_done + 1)) and run.epochs_done > 1
    np.testing.assert_array_equal([v for _, v in got], np.float32(run.metrics["test_acc"]))
    assert len(list((run_dir / "tensorboard").iterdir())) == 2  # an event file per session


def test_sessions_in_the_same_second_keep_their_own_files_in_epoch_order(tmp_path, monkeypatch):
    """tensorboardX names a file by its second and host alone: a resume within the same second
    must neither overwrite the first session's file nor sort before it."""
    from scoretrain.run import tensorboard

    monkeypatch.setattr("time.time", lambda: 1_800_000_000.0)
    row = dict(epoch=1, lr=0.1, train_loss=1.0, train_acc=0.5, test_loss=1.0, test_acc=0.5, val_loss=float("nan"),
               val_acc=float("nan"), mask_change=0.1, epoch_seconds=1.0)
    for first, pid in ((1, 900), (2, 100)):  # the later session has the smaller pid
        monkeypatch.setattr("os.getpid", lambda pid=pid: pid)
        log = tensorboard.EpochLog(tmp_path, first)
        for epoch in range(first, 2 if first == 1 else 5):  # the first logs epoch 1, the resumed 2-4
            log.epoch(dict(row, epoch=epoch, test_acc=epoch / 10), 0.5, [0.1])
        log.close()
    got = scalars(tmp_path)["accuracy/test"]
    assert [s for s, _ in got] == [1, 2, 3, 4]  # overwritten: [2, 3, 4]; read in pid order: [1] (the later steps dropped)


def test_without_the_writer_it_is_one_line_before_the_run_starts(tmp_path, small, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    result = runner.invoke(app, ["fit", FC, *small, "train.tensorboard=true", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "pip install 'scoretrain[tensorboard]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
