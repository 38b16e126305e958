"""The Python API (api.py): scoretrain.fit and scoretrain.resume train what `scoretrain fit` (and
`fit --resume`) train, bit for bit, and scoretrain.open_run reads a run as the commands do, as
NumPy arrays."""

import os

import numpy as np
import pytest
from typer.testing import CliRunner

import scoretrain
from conftest import FC, SMALL, assert_identical, stopped_run
from scoretrain.run import store
from scoretrain.cli import app
from scoretrain.errors import ConfigError, RunError


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The same run by the API and by the command line."""
    runs = tmp_path_factory.mktemp("api")
    base = [o for o in SMALL if not o.startswith("model.widths")]
    run = scoretrain.fit(FC, base, runs_dir=runs, name="api", model__k=0.3, model__widths=[784, 48, 10])
    result = CliRunner().invoke(app, ["fit", FC, *base, "model.k=0.3", "model.widths=[784,48,10]", "--runs-dir", str(runs), "--name", "cli", "-q"])
    assert result.exit_code == 0, result.output
    return run, runs


def test_fit_returns_the_run_the_command_line_would_have_trained(fitted):
    run, runs = fitted
    assert isinstance(run, scoretrain.RunRecord) and run.path == runs / "api" and run.status == "completed"
    assert run.spec.model.k == 0.3 and run.spec.model.widths == [784, 48, 10] and run.epochs_done == 2
    cli = store.load(runs / "cli")
    for layer, w, s, m in zip(run.layers, cli.weights, cli.scores, cli.masks, strict=True):
        assert layer.kind == "linear"
        np.testing.assert_array_equal(layer.weight, w)
        np.testing.assert_array_equal(layer.scores, s)
        np.testing.assert_array_equal(layer.mask, m)
    for key, values in run.metrics.items():
        assert isinstance(values, np.ndarray) and len(values) == 2
        if key != "epoch_seconds":
            np.testing.assert_array_equal(values, cli.metrics[key], err_msg=key)


def test_open_run_gives_the_subnetwork_and_evaluates_it(fitted):
    _, runs = fitted
    run = scoretrain.open_run(runs / "api")
    kept = [layer.mask.mean() for layer in run.layers]
    assert all(abs(k - 0.3) < 0.01 for k in kept)
    w_eff = run.subnetwork()
    for w, layer in zip(w_eff, run.layers, strict=True):
        np.testing.assert_array_equal(w, layer.weight * layer.mask)  # edge-popup: W * mask
    ev = run.evaluate()
    assert ev["matches_record"] and ev["test_acc"] == run.metrics["test_acc"][-1]
    assert run.batchnorm == [] and run.environments[0]["numpy"] == np.__version__
    assert "completed, 2 epochs, test acc" in repr(run)


def test_bad_input_raises_the_commands_one_line_error_and_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"model__k \(model.k\): expected a fraction in"):  # the argument's own name
        scoretrain.fit(FC, SMALL, runs_dir=tmp_path, model__k=1.5)
    with pytest.raises(ConfigError, match="unknown key"):
        scoretrain.fit(FC, SMALL, runs_dir=tmp_path, model__kk=0.5)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RunError, match="no such run directory"):
        scoretrain.open_run(tmp_path / "missing")


def test_the_api_resumes_an_interrupted_run_to_the_uninterrupted_runs_bits(tmp_path, small, reference):
    run_dir = stopped_run(tmp_path, small)  # a real `fit` process, stopped by SIGTERM after epoch 1
    assert scoretrain.open_run(run_dir).status == "interrupted"
    run = scoretrain.resume(run_dir)
    assert isinstance(run, scoretrain.RunRecord) and run.status == "completed"
    assert_identical(run_dir, reference("sgd"))
    with pytest.raises(RunError, match="already completed .*laid out over 4 epochs.*larger train.epochs"):
        scoretrain.resume(run_dir)  # a completed run is not extended: its schedule was laid out over its epochs
    assert os.path.realpath(run_dir) not in store._claims  # the refusal released the run's lock


def test_the_public_api_is_what_dir_lists():
    names = [n for n in dir(scoretrain) if not n.startswith("_")]
    assert names == ["RunRecord", "fit", "measure", "open_run", "open_ticket", "resume"]
    for name in names:
        assert callable(getattr(scoretrain, name))
