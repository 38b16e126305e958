"""The validation split (`data.val_samples`): held-out training images, chosen the same way
whatever the run's seed, never trained on nor standardized with, measured every epoch into
/metrics val_loss and val_acc, and used by `compare` to pick the epoch (the test split chooses
nothing)."""

import json
import math

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FC, assert_identical, merged, stopped_run
from scoretrain.run import config, store
from scoretrain.run.resources import load_data, network
from scoretrain.run.step import evaluate
from scoretrain.data import datasets as data
from scoretrain.kernels.backend import Backend
from scoretrain.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_the_split_is_fixed_disjoint_and_nested():
    tr, va = data.validation_split(1000, 100)
    assert len(va) == 100 and len(tr) == 900 and not set(tr) & set(va) and sorted({*tr, *va}) == list(range(1000))
    assert np.array_equal(va, np.sort(va)) and np.array_equal(tr, np.sort(tr))
    assert np.array_equal(data.validation_split(1000, 100)[1], va)  # no state: the same split every time
    assert set(va) < set(data.validation_split(1000, 300)[1])  # a larger split holds the smaller one
    assert not np.array_equal(va, np.arange(100))  # spread over the images, not the first ones


def test_the_held_out_images_are_neither_trained_on_nor_standardized_with():
    n, v = 3000, 500
    runs = [load_data(config.load(FC, [f"data.train_samples={n}", f"data.val_samples={v}", f"seed={seed}"]), Backend(np, "cpu"))
            for seed in (0, 7)]
    ds = data.load("mnist")
    tr, va = data.validation_split(n, v)
    for dd in runs:
        assert (len(dd.y_train), len(dd.y_val)) == (n - v, v)
        np.testing.assert_array_equal(dd.y_val, ds.y_train[va])
        np.testing.assert_array_equal(dd.y_train, ds.y_train[tr])
        assert (dd.mean, dd.std) == data.standardization(ds.x_train[tr])
        np.testing.assert_array_equal(dd.x_val, data.to_float(ds.x_train[va], dd.mean, dd.std))
    np.testing.assert_array_equal(runs[0].x_val, runs[1].x_val)  # independent of the run's seed


def test_fit_measures_the_split_every_epoch_and_compare_selects_by_it(tmp_path, small):
    args = [*merged(small, ["data.val_samples=400", "train.epochs=3"])]
    assert cli("fit", FC, *args, "--runs-dir", tmp_path, "--name", "v", "-q").exit_code == 0
    run, cfg = store.open_run(tmp_path / "v")
    m = run.metrics
    assert len(m["val_acc"]) == 3 and all(0.1 < a <= 1 for a in m["val_acc"]) and all(math.isfinite(x) for x in m["val_loss"])
    # the recorded figure is the stored network measured on the held-out images
    dd = load_data(cfg, Backend(np, "cpu"), run.attrs["input_mean"], run.attrs["input_std"])
    net = network(cfg, dd.info, Backend(np, "cpu"), run.weights, run.scores)
    loss, acc = evaluate(net, net.subnetwork(run.masks), dd.x_val, dd.y_val, cfg.train.eval_batch_size)
    assert (loss, acc) == (m["val_loss"][-1], m["val_acc"][-1])
    row = json.loads(cli("compare", tmp_path / "v", "--json").stdout)[0]
    best = int(np.argmax(m["val_acc"]))  # the first best epoch
    assert (row["best_val_epoch"], row["best_val_acc"], row["test_at_best_val"]) == (best + 1, m["val_acc"][best], m["test_acc"][best])
    table = cli("compare", tmp_path).stdout
    assert "at best val (epoch)" in table and f"{100 * m['test_acc'][best]:.2f}% ({best + 1})" in table


def test_without_a_split_nothing_changes(tmp_path, small):
    assert cli("fit", FC, *small, "--runs-dir", tmp_path, "--name", "n", "-q").exit_code == 0
    run = store.load(tmp_path / "n")
    assert all(math.isnan(v) for v in run.metrics["val_acc"] + run.metrics["val_loss"])
    assert "at best val" not in cli("compare", tmp_path).stdout
    assert json.loads(cli("compare", tmp_path, "--json").stdout)[0]["test_at_best_val"] is None


def test_a_run_written_before_the_split_existed_still_reads(tmp_path, small):
    assert cli("fit", FC, *small, "--runs-dir", tmp_path, "--name", "old", "-q").exit_code == 0
    with h5py.File(tmp_path / "old" / "run.h5", "r+") as f:
        del f["metrics/val_loss"], f["metrics/val_acc"]
    run = store.load(tmp_path / "old")
    assert len(run.metrics["val_acc"]) == 2 and all(math.isnan(v) for v in run.metrics["val_acc"])
    assert cli("compare", tmp_path).exit_code == 0


@pytest.mark.parametrize("overrides,fragment", [
    (["data.val_samples=2000"], "data.val_samples: expected fewer than data.train_samples (2000), got 2000"),
    (["data.val_samples=-1"], "data.val_samples: expected an integer >= 0, got -1"),
    (["data.train_samples=null", "data.val_samples=60000"], "data.val_samples: expected fewer than the 60,000 training images, got 60000"),
])
def test_a_split_that_leaves_nothing_to_train_on_is_refused(tmp_path, small, overrides, fragment):
    result = cli("fit", FC, *merged(small, overrides), "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and fragment in result.stderr and len(result.stderr.splitlines()) == 1, result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_run_with_a_split_resumes_bit_identically(tmp_path, small, reference):
    run_dir = stopped_run(tmp_path, small, "data.val_samples=300", after=2)
    assert cli("fit", "--resume", run_dir, "-q").exit_code == 0
    assert_identical(run_dir, reference("sgd", "data.val_samples=300"))
    assert not math.isnan(store.load(run_dir).metrics["val_acc"][-1])
