"""End to end through the command line, on a small slice of the real MNIST."""

import json

import h5py
import numpy as np
import pytest
from conftest import for_arch, merged
from typer.testing import CliRunner

from scoretrain.run import store
from scoretrain.cli import app

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
FC = str(ROOT / "configs/mnist_fc.yaml")
runner = CliRunner()


def fit(tmp_path, *args):
    return runner.invoke(app, ["fit", FC, *args, "--runs-dir", str(tmp_path)])


def test_fit_writes_a_complete_run_and_eval_reproduces_it(tmp_path, small):
    result = fit(tmp_path, *merged(small, ["model.k=0.3"]), "--name", "k03")
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
    assert fit(tmp_path, *merged(small, ["model.method=dense"]), "--name", "dense").exit_code == 0
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
    assert fit(tmp_path, *merged(small, ["seed=1"]), "--name", "c").exit_code == 0
    assert not np.array_equal(store.load(tmp_path / "c").masks[0], a.masks[0])


def test_generated_names_and_no_overwrite(tmp_path, small):
    assert fit(tmp_path, *merged(small, ["train.epochs=1"])).exit_code == 0
    assert fit(tmp_path, *merged(small, ["train.epochs=1"])).exit_code == 0
    assert len(list(tmp_path.iterdir())) == 2
    assert fit(tmp_path, *merged(small, ["train.epochs=1"]), "--name", "x").exit_code == 0
    before = (tmp_path / "x" / "run.h5").read_bytes()
    result = fit(tmp_path, *merged(small, ["train.epochs=1"]), "--name", "x")
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
    assert fit(tmp_path, *merged(small, ["train.epochs=1"]), "--name", "r").exit_code == 0
    with h5py.File(tmp_path / "r" / "run.h5", "r", locking=False) as f:
        assert f["metrics/epoch"].shape == (1,)


@pytest.mark.parametrize("variant", [["model.method=biprop"], ["model.method=supermask", "train.lr=50", "train.weight_decay=0"],
                                     ["model.k_scope=global"], ["model.arch=lenet", "model.width=0.125"]])
def test_every_method_and_arch_is_reproduced_by_eval(tmp_path, small, variant):
    assert fit(tmp_path, *merged(for_arch(small, variant), variant), "--name", "r").exit_code == 0
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


def test_version_and_short_help():
    import subprocess
    import sys

    from scoretrain import __version__

    out = subprocess.run([sys.executable, "-m", "scoretrain", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == f"scoretrain {__version__}\n"
    for args in (["-h"], ["sweep", "-h"], ["data", "-h"], ["config", "show", "-h"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage:" in result.output, args


def test_help_names_each_extra_as_the_readme_does():
    """README's table of extras, and the --help of the command each is for."""
    import re
    import subprocess
    import sys

    table = dict(re.findall(r"^\| `(\w+)` \| `?([a-z ]+?)[ `]", (ROOT / "README.md").read_text(), re.M))
    assert {"plot", "onnx", "slurm"} <= set(table), table
    for extra, command in (("plot", "compare"), ("onnx", "export"), ("slurm", "sweep")):
        out = subprocess.run([sys.executable, "-m", "scoretrain", command, "--help"], capture_output=True, text=True,
                             env={**__import__("os").environ, "COLUMNS": "500"})
        assert f"pip install 'scoretrain[{extra}]'" in out.stdout, (extra, command)
        assert table[extra] == command, table


def test_export_makes_a_missing_folder_as_fit_makes_its_runs_dir(tmp_path, small):
    assert fit(tmp_path / "runs", *merged(small, ["train.epochs=1"]), "--name", "r").exit_code == 0
    result = runner.invoke(app, ["export", str(tmp_path / "runs" / "r"), "--to", str(tmp_path / "out" / "deep" / "r.npz")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "deep" / "r.npz").is_file()


def test_inspect_reads_a_ticket_as_eval_does(tmp_path, small):
    assert fit(tmp_path, *merged(small, ["train.epochs=1"]), "--name", "r").exit_code == 0
    assert runner.invoke(app, ["export", str(tmp_path / "r"), "--to", str(tmp_path / "r.ticket")]).exit_code == 0
    run = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "r"), "--json"]).stdout)
    result = runner.invoke(app, ["inspect", str(tmp_path / "r.ticket"), "--json"])
    assert result.exit_code == 0, result.output
    ticket = json.loads(result.stdout)
    assert ticket["status"] == "ticket" and ticket["kept"] == run["kept"] and ticket["test_acc"] == run["test_acc"]
    assert [L["kept"] for L in ticket["layers"]] == [L["kept"] for L in run["layers"]]
    assert [L["weights"] for L in ticket["layers"]] == [L["weights"] for L in run["layers"]]  # regenerated from the seed
    table = runner.invoke(app, ["inspect", str(tmp_path / "r.ticket")])
    assert table.exit_code == 0 and "ticket" in table.stdout and "kept" in table.stdout


def test_bn_recalibration_beyond_the_training_set_is_refused_once_its_size_is_known(tmp_path):
    """With data.train_samples null, the refusal waits for the data's size: still before any folder."""
    result = runner.invoke(app, ["fit", FC, "model.arch=lenet", "model.width=0.125", "model.bn=nonaffine", "device=cpu",
                                 "train.bn_recalibration=60001", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "train.bn_recalibration: expected at most the 60,000 training images" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_key_given_twice_on_the_command_line_is_refused_and_nothing_is_written(tmp_path):
    result = fit(tmp_path / "runs", "model.k=0.3", "train.epochs=1", "model.k=0.5")
    assert result.exit_code == 2 and "model.k: given twice (model.k=0.3, then model.k=0.5): give each key once" in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    shown = runner.invoke(app, ["config", "show", FC, "train.lr=0.1", "train.lr=0.2"])
    assert shown.exit_code == 2 and "train.lr: given twice" in shown.stderr
