"""`scoretrain export`: the .npz alone, run by a forward pass written here in plain NumPy, gives
exactly `scoretrain eval`'s test accuracy."""

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import for_arch, merged
from typer.testing import CliRunner

from scoretrain.run import store
from scoretrain.cli import app

ROOT = Path(__file__).resolve().parent.parent
FC = str(ROOT / "configs/mnist_fc.yaml")
runner = CliRunner()
_built = {}  # each run is trained once per session

RUNS = {
    "mlp": ["model.k=0.3"],
    "lenet": ["model.arch=lenet", "model.width=0.25", "train.epochs=1"],
    "dense": ["model.method=dense"],
    # biprop with non-constant weights: W_eff = alpha * sign(W) * mask, alpha != |W|
    "biprop": ["model.method=biprop", "model.init=kaiming_normal", "model.k=0.4"],
    # residual nets (the .npz's reader below has no BatchNorm: these are for the ONNX export)
    "resnet20": ["model.arch=resnet20", "model.width=0.25", "model.bn=nonaffine", "train.epochs=1", "data.train_samples=600",
                 "train.bn_recalibration=600"],
    "resnet20-affine": ["model.arch=resnet20", "model.width=0.25", "model.bn=affine", "train.epochs=1", "data.train_samples=600",
                        "train.bn_recalibration=600"],
}
PLAIN = ["mlp", "lenet", "dense", "biprop"]


@pytest.fixture
def trained(small, tmp_path_factory):
    def get(name):
        if name not in _built:
            runs = tmp_path_factory.mktemp("export-runs")
            result = runner.invoke(app, ["fit", FC, *merged(for_arch(small, RUNS[name]), RUNS[name]), "--name", name, "--runs-dir", str(runs), "-q"])
            assert result.exit_code == 0, result.output
            _built[name] = runs / name
        return _built[name]

    return get


def mnist_test(n):
    """The first n MNIST test images (uint8 [n, 28, 28, 1]) and labels, straight from the IDX files."""
    with gzip.open(ROOT / "data/mnist/t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(ROOT / "data/mnist/t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images[:n], labels[:n]


# --- a forward pass from the .npz alone: numpy and json only, nothing of scoretrain ------------


def conv_same(x, w):
    """[N, H, W, C] * [O, kh, kw, C] -> [N, H, W, O]: zero 'same' padding, stride 1, as im2col."""
    o, kh, kw, c = w.shape
    n, h, wd, _ = x.shape
    p = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    cols = np.stack([p[:, i : i + h, j : j + wd] for i in range(kh) for j in range(kw)], axis=3)  # [N, H, W, kh*kw, C]
    return (cols.reshape(n * h * wd, kh * kw * c) @ w.reshape(o, -1).T).reshape(n, h, wd, o)


def load(path):
    """The exported arrays and the architecture's JSON, by numpy (.npz) or safetensors alone."""
    if path.suffix == ".npz":
        return np.load(path)  # no allow_pickle: plain arrays and strings only
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {**{k: f.get_tensor(k) for k in f.keys()}, "architecture": f.metadata()["architecture"]}


def predict(path, pixels):
    z = load(path)
    x = pixels.astype(np.float32) / np.float32(255)
    x = (x - z["input_mean"]) / z["input_std"]
    for layer in json.loads(str(z["architecture"])):
        kind = layer["type"]
        if kind == "linear":
            x = x @ z[layer["weight"]].T
        elif kind == "conv":
            x = conv_same(x, z[layer["weight"]])
        elif kind == "relu":
            x = np.maximum(x, 0)
        elif kind == "maxpool":
            n, h, w, c = x.shape
            x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
        elif kind == "flatten":
            x = x.reshape(len(x), -1)
        else:
            raise AssertionError(f"unknown layer {kind}")
    return x.argmax(1)


# --- tests ------------------------------------------------------------------------------------


def export(run_dir, dest, *args):
    return runner.invoke(app, ["export", str(run_dir), "--to", str(dest), *args])


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("name", PLAIN)
def test_the_exported_file_alone_reproduces_eval_exactly(trained, tmp_path, name, suffix):
    run_dir = trained(name)
    dest = tmp_path / f"net{suffix}"
    result = export(run_dir, dest)
    assert result.exit_code == 0, result.output
    ev = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert ev.exit_code == 0, ev.output
    ev = json.loads(ev.stdout)
    images, labels = mnist_test(ev["test_samples"])
    correct = int((predict(dest, images) == labels).sum())
    assert correct / len(labels) == ev["test_acc"] == ev["recorded_test_acc"]
    assert ev["test_acc"] > 0.5  # a network that learned, not one that happens to agree on noise


@pytest.mark.parametrize("name", PLAIN)
def test_the_npz_holds_the_effective_weights_and_the_architecture(trained, tmp_path, name):
    run_dir = trained(name)
    assert export(run_dir, tmp_path / "net.npz").exit_code == 0
    z = np.load(tmp_path / "net.npz")
    run = store.load(run_dir)
    arch = json.loads(str(z["architecture"]))
    weight_layers = [layer for layer in arch if layer["type"] in ("linear", "conv")]
    assert [layer["weight"] for layer in weight_layers] == [f"weight_{i:02d}" for i in range(len(run.weights))]
    assert sorted(k for k in z.files if k.startswith("weight_")) == [layer["weight"] for layer in weight_layers]
    assert arch[-1]["type"] == "linear" and arch[-1]["shape"] == [10, weight_layers[-1]["shape"][1]]
    for layer, w in zip(weight_layers, run.weights):
        assert list(z[layer["weight"]].shape) == layer["shape"] == list(w.shape)
        assert z[layer["weight"]].dtype == np.float32
    assert z["image_shape"].tolist() == [28, 28, 1] and int(z["n_classes"]) == 10
    assert z["input_mean"].tolist() == np.float32(run.attrs["input_mean"]).reshape(-1).tolist()
    info = json.loads(str(z["info"]))
    assert info["format"] == "scoretrain-subnetwork" and info["epochs_done"] == run.epochs_done
    assert info["test_acc"] == run.metrics["test_acc"][-1]
    assert info["test_acc_on"] == "the first 500 images of the mnist test split"  # SMALL's data.test_samples
    weights = [z[layer["weight"]] for layer in weight_layers]
    if name == "dense":
        for we, w in zip(weights, run.weights):
            np.testing.assert_array_equal(we, w)
    elif name == "biprop":
        for we, w, m in zip(weights, run.weights, run.masks):
            alpha = np.abs(w[m]).astype(np.float64).mean()
            assert np.array_equal(we != 0, m) and np.array_equal(np.sign(we[m]), np.sign(w[m]))
            np.testing.assert_allclose(np.abs(we[m]), alpha, rtol=1e-5)  # one magnitude per layer
    else:
        for we, w, m in zip(weights, run.weights, run.masks):
            np.testing.assert_array_equal(we, w * m)
    if name == "lenet":
        assert [layer["type"] for layer in arch] == ["conv", "relu", "maxpool", "conv", "relu", "maxpool", "flatten",
                                                     "linear", "relu", "linear"]
        assert arch[0] == {"type": "conv", "weight": "weight_00", "shape": [8, 5, 5, 1], "padding": "same", "stride": 1}


def test_refuses_to_overwrite_unless_forced_and_leaves_no_temp_files(trained, tmp_path):
    dest = tmp_path / "net.npz"
    dest.write_bytes(b"keep me")
    result = export(trained("mlp"), dest)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "already exists" in result.stderr and "--force" in result.stderr
    assert dest.read_bytes() == b"keep me"
    assert export(trained("mlp"), dest, "--force").exit_code == 0
    assert sorted(np.load(dest).files)[:2] == ["architecture", "image_shape"]
    assert [p.name for p in tmp_path.iterdir()] == ["net.npz"]  # the temporary file was renamed, none left


@pytest.mark.parametrize("make,message", [
    (lambda run, tmp: (tmp / "missing", tmp / "a.npz"), "no such run directory"),
    (lambda run, tmp: (tmp, tmp / "a.npz"), "not a scoretrain run"),
    (lambda run, tmp: (run, run / "run.h5" / "a.npz"), "not a folder (a file)"),
    (lambda run, tmp: (run, tmp), "is a folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, make, message):
    run_dir, dest = make(trained("mlp"), tmp_path)
    result = export(run_dir, dest)
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_loader_in_the_docs_works(trained, tmp_path, monkeypatch):
    """docs/run-format.md's example, run as written, predicts what the forward pass here does."""
    doc = (ROOT / "docs/run-format.md").read_text()
    section = doc[doc.index("## Exported subnetworks"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "scoretrain" not in code.replace('"scoretrain-subnetwork"', "")  # no scoretrain imports
    assert export(trained("lenet"), tmp_path / "subnet.npz").exit_code == 0
    monkeypatch.chdir(tmp_path)  # the example loads "subnet.npz"
    space = {}
    exec(code, space)
    images, _ = mnist_test(500)
    np.testing.assert_array_equal(space["predict"](images), predict(tmp_path / "subnet.npz", images))


# --- ONNX: the real onnxruntime runs the exported model --------------------------------------


def scoretrain_logits(run_dir):
    """The stored subnetwork's logits on the run's test split, as `eval` computes them."""
    from scoretrain.run import resources
    from scoretrain.kernels.backend import Backend

    run, cfg = store.open_run(run_dir)
    cpu = Backend(np, "cpu")
    dd = resources.load_data(cfg, cpu, run.attrs["input_mean"], run.attrs["input_std"])
    net = resources.network(cfg, dd.info, cpu, run.weights, run.scores, run.norms)
    return net.logits(dd.x_test, resources.stored_subnetwork(net, run.masks))


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet20-affine"])  # affine BN: the non-affine graph's, with gamma and beta
def test_onnxruntime_runs_the_exported_model_to_evals_predictions(trained, tmp_path, name):
    ort = pytest.importorskip("onnxruntime", reason="pip install 'scoretrain[onnx]'")
    run_dir = trained(name)
    dest = tmp_path / "net.onnx"
    result = export(run_dir, dest)
    assert result.exit_code == 0, result.output
    ev = json.loads(runner.invoke(app, ["eval", str(run_dir), "--json"]).stdout)
    images, labels = mnist_test(ev["test_samples"])
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == ["logits"]
    (logits,) = session.run(None, {"images": images.astype(np.float32) / np.float32(255)})  # standardized in the graph
    ours = scoretrain_logits(run_dir)
    np.testing.assert_array_equal(logits.argmax(1), ours.argmax(1))  # every test image's prediction
    assert np.abs(logits - ours).max() <= 1e-4 * max(1.0, np.abs(ours).max())  # other summation orders, no more
    assert (logits.argmax(1) == labels).mean() == ev["test_acc"]
    assert len(np.unique(logits.argmax(1))) >= 3  # predictions that vary: the agreement is no accident of a constant output
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["info"])["run"] == str(run_dir) and json.loads(meta["architecture"])[0]["type"] in ("flatten", "conv")


def test_onnx_export_without_the_package_is_one_line(trained, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    result = export(trained("mlp"), tmp_path / "net.onnx")
    assert result.exit_code == 1 and "pip install 'scoretrain[onnx]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_an_unknown_suffix_or_a_run_still_training_is_one_line_and_writes_nothing(trained, tmp_path):
    import os
    import shutil
    import socket

    import h5py

    result = export(trained("mlp"), tmp_path / "net.pt")
    assert result.exit_code == 1 and "unknown format .pt; name the file FILE.npz, FILE.safetensors, FILE.onnx or FILE.ticket" in result.stderr
    live = tmp_path / "live"
    shutil.copytree(trained("mlp"), live)
    with h5py.File(live / "run.h5", "r+") as f:  # as a run that this (live) process trains
        f.attrs.update(status="running", pid=os.getpid(), host=socket.gethostname())
    result = export(live, tmp_path / "net.npz")
    assert result.exit_code == 1 and "is still training" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live"]


# --- the ticket: seed + 1-bit masks, the weights regenerated --------------------------------------

TICKETS = {  # the shipped networks at full size, a short training on a slice of MNIST
    "mnist_fc": [FC, "data.train_samples=1000", "data.test_samples=500", "train.epochs=1"],
    "resnet20": [str(ROOT / "configs/mnist_resnet20.yaml"), "data.train_samples=128", "data.test_samples=100", "train.epochs=1",
                 "train.bn_recalibration=128"],
}


@pytest.mark.parametrize("name, limit", [("mnist_fc", 40_000), ("resnet20", 15_000)])
def test_a_ticket_is_kilobytes_and_eval_regenerates_the_subnetwork_exactly(tmp_path, name, limit):
    import scoretrain

    result = runner.invoke(app, ["fit", *TICKETS[name], "--runs-dir", str(tmp_path), "--name", "r", "-q"])
    assert result.exit_code == 0, result.output
    dest = tmp_path / "r.ticket"
    assert export(tmp_path / "r", dest).exit_code == 0
    size = dest.stat().st_size
    assert size <= limit, f"{size} bytes"
    run = store.load(tmp_path / "r")
    n_weights = sum(w.size for w in run.weights)
    assert size >= n_weights / 8  # a bit per weight: the masks are really there
    ticket_eval = json.loads(runner.invoke(app, ["eval", str(dest), "--json"]).stdout)
    run_eval = json.loads(runner.invoke(app, ["eval", str(tmp_path / "r"), "--json"]).stdout)
    assert ticket_eval["matches_record"] and ticket_eval["test_acc"] == run_eval["test_acc"] == run.metrics["test_acc"][-1]
    t = scoretrain.open_ticket(dest)  # the Python API: the same regenerated network
    for w, m, w0, m0 in zip(t.weights, t.masks, run.weights, run.masks, strict=True):
        np.testing.assert_array_equal(w, w0)
        np.testing.assert_array_equal(m, m0)
    for s, s0 in zip(t.norms, run.norms or [], strict=True):
        np.testing.assert_array_equal(s, s0)


def test_an_edited_or_damaged_ticket_or_a_run_without_one_is_one_line(trained, tmp_path):
    dest = tmp_path / "t.ticket"
    assert export(trained("mlp"), dest).exit_code == 0
    raw = dest.read_bytes()
    n = int.from_bytes(raw[20:24], "little")
    header = json.loads(raw[24 : 24 + n])

    def with_header(h):
        text = json.dumps(h, separators=(",", ":")).encode()
        return raw[:20] + len(text).to_bytes(4, "little") + text + raw[24 + n :]

    cases = {
        "seed.ticket": (with_header(dict(header, seed=7, spec=header["spec"].replace("seed: 0", "seed: 7"))), "its weights cannot be regenerated"),
        "header.ticket": (with_header(dict(header, seed=7)), "an edited ticket"),
        "short.ticket": (raw[:-5], "not a readable scoretrain ticket"),
        "junk.ticket": (b"PK\x03\x04 not a ticket", "not a readable scoretrain ticket"),
    }
    for file, (content, message) in cases.items():
        (tmp_path / file).write_bytes(content)
        result = runner.invoke(app, ["eval", str(tmp_path / file)])
        assert result.exit_code == 1 and message in result.stderr, (file, result.output)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    result = export(trained("dense"), tmp_path / "dense.ticket")
    assert result.exit_code == 1 and "no ticket: the run learns its weights (dense)" in result.stderr
    assert not (tmp_path / "dense.ticket").exists()


# --- PyTorch's pruning convention ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet", "resnet20-affine", "biprop"])
def test_the_torch_prune_layout_names_every_tensor_and_multiplies_to_the_effective_weights(trained, tmp_path, name):
    """Without torch: the names, the layouts, and weight_orig * weight_mask = the .npz's weights
    (a conv's transposed to [out, in, kh, kw]; the linear after a flatten, its columns in
    channels-first order)."""
    from safetensors.numpy import load_file

    run_dir = trained(name)
    assert export(run_dir, tmp_path / "t.safetensors", "--layout", "torch-prune").exit_code == 0
    assert export(run_dir, tmp_path / "s.npz").exit_code == 0
    t, z = load_file(str(tmp_path / "t.safetensors")), np.load(tmp_path / "s.npz")
    arch = json.loads(str(z["architecture"]))
    origs = sorted(k for k in t if k.endswith(".weight_orig"))
    assert len(origs) == sum(k.startswith("weight_") for k in z.files)
    assert all(set(np.unique(t[k.replace("orig", "mask")])) <= {0.0, 1.0} for k in origs)
    if name == "lenet":  # conv relu pool conv relu pool flatten linear relu linear
        np.testing.assert_array_equal(t["0.weight_orig"] * t["0.weight_mask"], z["weight_00"].transpose(0, 3, 1, 2))
        h, w, c = 7, 7, z["weight_01"].shape[0]
        order = np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)
        np.testing.assert_array_equal(t["7.weight_orig"] * t["7.weight_mask"], z["weight_02"][:, order])
    if name == "resnet20-affine":
        assert arch[3]["type"] == "residual" and "3.main.0.weight_orig" in t and "3.main.1.running_var" in t
        assert {"1.running_mean", "1.running_var", "1.num_batches_tracked", "1.weight", "1.bias"} <= set(t)
    if name == "biprop":  # alpha * sign(W) * mask, as the product
        np.testing.assert_allclose(t["1.weight_orig"] * t["1.weight_mask"], z["weight_00"], rtol=0, atol=0)
    result = export(run_dir, tmp_path / "t.npz", "--layout", "torch-prune")
    assert result.exit_code == 1 and "--layout torch-prune writes a .safetensors file" in result.stderr


@pytest.mark.parametrize("name", ["lenet", "resnet20", "resnet20-affine", "mlp"])
def test_the_torch_loader_in_the_docs_loads_the_export_into_pytorch_and_predicts_as_eval(trained, tmp_path, monkeypatch, name):
    """docs/run-format.md's PyTorch example, run as written with the real torch: every test
    image's prediction is eval's."""
    pytest.importorskip("torch", reason="torch is not installed (it is no dependency of scoretrain)")
    doc = (ROOT / "docs/run-format.md").read_text()
    section = doc[doc.index("### PyTorch's pruning convention"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "scoretrain" not in code
    run_dir = trained(name)
    assert export(run_dir, tmp_path / "subnet.safetensors", "--layout", "torch-prune").exit_code == 0
    monkeypatch.chdir(tmp_path)
    space = {}
    exec(code, space)
    ev = json.loads(runner.invoke(app, ["eval", str(run_dir), "--json"]).stdout)
    images, labels = mnist_test(ev["test_samples"])
    import torch

    with torch.no_grad():
        predicted = space["predict"](images)
    np.testing.assert_array_equal(predicted, scoretrain_logits(run_dir).argmax(1))
    assert (predicted == labels).mean() == ev["test_acc"]
