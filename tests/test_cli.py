"""End to end through the command line, on a small slice of the real MNIST."""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from scoretrain.run import store
from scoretrain.cli import app

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
FC = str(ROOT / "configs/mnist_fc.yaml")
runner = CliRunner()


def fit(tmp_path, *args):
    return runner.invoke(app, ["fit", FC, *args, "--runs-dir", str(tmp_path)])


def test_fit_writes_a_complete_run_and_eval_reproduces_it(tmp_path, small):
    result = fit(tmp_path, *small, "model.k=0.3", "--name", "k03")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "k03"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "run.h5"]
    assert "epoch 2/2" in result.output and "completed" in result.output
    run = store.load(run_dir)
    assert run.attrs["status"] == "completed" and run.epochs_done == 2
    assert run.metrics["epoch"] == [1, 2] and all(s > 0 for s in run.metrics["epoch_seconds"])
    assert run.metrics["test_acc"][-1] > 0.6  # 2000 images, 2 epochs, 30% of a small net: far above chance (0.1)
    for w, m in zip(run.weights, run.masks):
        assert m.sum() == round(0.3 * w.size)
    result = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["test_acc"] == run.metrics["test_acc"][-1] and out["matches_record"] is True
    assert out["masks_match_scores"] is True and out["test_samples"] == 500
    assert "reproduced exactly" in runner.invoke(app, ["eval", str(run_dir)]).output


def test_weights_never_change_in_edge_popup_and_do_in_dense(tmp_path, small):
    from scoretrain.run.config import ModelConfig
    from scoretrain.nn.model import init_network

    assert fit(tmp_path, *small, "--name", "ep").exit_code == 0
    assert fit(tmp_path, *small, "model.method=dense", "--name", "dense").exit_code == 0
    initial, _ = init_network(ModelConfig(widths=[784, 64, 10]), seed=0)
    ep, dense = store.load(tmp_path / "ep"), store.load(tmp_path / "dense")
    for w0, w_ep, w_d in zip(initial, ep.weights, dense.weights):
        np.testing.assert_array_equal(w0, w_ep)
        assert not np.array_equal(w0, w_d)
    assert dense.scores is None and dense.metrics["test_acc"][-1] > 0.8


def test_same_seed_gives_identical_runs(tmp_path, small):
    for name in ("a", "b"):
        assert fit(tmp_path, *small, "--name", name).exit_code == 0
    a, b = store.load(tmp_path / "a"), store.load(tmp_path / "b")
    for x, y in zip(a.masks + a.scores, b.masks + b.scores):
        np.testing.assert_array_equal(x, y)
    for key in ("train_loss", "test_loss", "test_acc"):
        assert a.metrics[key] == b.metrics[key]
    assert fit(tmp_path, *small, "seed=1", "--name", "c").exit_code == 0
    assert not np.array_equal(store.load(tmp_path / "c").masks[0], a.masks[0])


def test_generated_names_and_no_overwrite(tmp_path, small):
    assert fit(tmp_path, *small, "train.epochs=1").exit_code == 0
    assert fit(tmp_path, *small, "train.epochs=1").exit_code == 0
    assert len(list(tmp_path.iterdir())) == 2
    assert fit(tmp_path, *small, "train.epochs=1", "--name", "x").exit_code == 0
    before = (tmp_path / "x" / "run.h5").read_bytes()
    result = fit(tmp_path, *small, "train.epochs=1", "--name", "x")
    assert result.exit_code == 1 and "already exists" in result.output
    assert (tmp_path / "x" / "run.h5").read_bytes() == before


@pytest.mark.parametrize("args,code,message", [
    (["model.k=2"], 2, "model.k: expected a fraction in (0, 1], got 2.0"),
    (["model.kk=0.3"], 2, "did you mean 'model.k'?"),
    (["model.k"], 2, "expected key=value"),
    (["data.root=/nonexistent"], 1, "dataset mnist: files not found in /nonexistent/mnist"),
])
def test_bad_input_is_one_line_and_creates_no_run(tmp_path, small, args, code, message):
    result = fit(tmp_path, *small, *args)
    assert result.exit_code == code
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_eval_refuses_what_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no such run directory" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 1 and "not a scoretrain run" in result.output


def test_run_file_is_readable_while_training_would_be(tmp_path, small):
    """Another process may open run.h5 at any time: it is a complete file from the first moment."""
    assert fit(tmp_path, *small, "train.epochs=1", "--name", "r").exit_code == 0
    with h5py.File(tmp_path / "r" / "run.h5", "r", locking=False) as f:
        assert f["metrics/epoch"].shape == (1,)


@pytest.mark.parametrize("variant", [["model.method=biprop"], ["model.method=supermask", "train.lr=50", "train.weight_decay=0"],
                                     ["model.k_scope=global"], ["model.arch=lenet", "model.width=0.125"]])
def test_every_method_and_arch_is_reproduced_by_eval(tmp_path, small, variant):
    assert fit(tmp_path, *small, *variant, "--name", "r").exit_code == 0
    run = store.load(tmp_path / "r")
    assert run.metrics["test_acc"][-1] > 0.3  # learned something (chance: 0.1)
    out = json.loads(runner.invoke(app, ["eval", str(tmp_path / "r"), "--json"]).output)
    assert out["matches_record"] is True and out["masks_match_scores"] is True
    assert len(run.mask_change_layers) == 2 and all(0 <= c <= 1 for row in run.mask_change_layers for c in row)


def test_the_gpu_install_hint_matches_the_driver():
    from scoretrain.kernels.backend import extra_for

    assert extra_for(12080) == "scoretrain[cuda12]" and extra_for(13000) == "scoretrain[cuda13]"
    assert "cuda12] or scoretrain[cuda13]" in extra_for(None) and "nvidia-smi" in extra_for(11080)


def test_config_show_prints_the_spec_fit_would_train_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["config", "show", FC, "model.k=0.3", "train.epochs=3"])
    assert result.exit_code == 0, result.output
    from scoretrain.run import config

    shown = config.from_text(result.output, "the shown spec")
    assert shown == config.load(FC, ["model.k=0.3", "train.epochs=3"])  # the resolved spec, defaults filled in
    assert shown.model.k == 0.3 and shown.train.epochs == 3 and shown.train.lr == config.load(FC).train.lr
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written
    bad = runner.invoke(app, ["config", "show", FC, "model.k=2"])
    assert bad.exit_code == 2 and "model.k" in bad.output  # validated as fit validates it
