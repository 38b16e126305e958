"""Your data and your network: arrays files, any number of classes, networks as layer lists,
the data's identity in the run, and the Python API on all of them."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import scoretrain
from conftest import SMALL, arrays_digest
from scoretrain.cli import app
from scoretrain.data import datasets
from scoretrain.data.arrays import ArrayFile
from scoretrain.data.source import map_labels
from scoretrain.errors import ConfigError, DataError
from scoretrain.run import config, store

ROOT = Path(__file__).resolve().parent.parent
FC = str(ROOT / "configs/mnist_fc.yaml")
runner = CliRunner()


def mnist(n_train: int, n_test: int):
    ds = datasets.load("mnist")
    return ds.x_train[:n_train], ds.y_train[:n_train], ds.x_test[:n_test], ds.y_test[:n_test]


def fit(*args):
    return runner.invoke(app, ["fit", *map(str, args), "-q"])


def write_arrays(path: Path, x_train, y_train, x_test, y_test, **more) -> Path:
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **more)
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as f:
            for k, v in arrays.items():
                f[k] = v
    return path


# --- your arrays ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_mnist_as_your_own_file_trains_to_the_bits_of_the_builtin(tmp_path, suffix):
    """The same images in the same order, standardized alike: the same run, bit for bit."""
    x, y, xt, yt = mnist(2000, 500)
    write_arrays(tmp_path / f"mine{suffix}", x[..., 0], y, xt[..., 0], yt)  # [N, H, W]: one channel
    assert fit(FC, *SMALL, "--runs-dir", tmp_path, "--name", "builtin").exit_code == 0
    result = fit(FC, *SMALL, "data.name=null", f"data.path={tmp_path / f'mine{suffix}'}", "--runs-dir", tmp_path, "--name", "own")
    assert result.exit_code == 0, result.output
    assert arrays_digest(tmp_path / "own") == arrays_digest(tmp_path / "builtin")
    own = store.load(tmp_path / "own")
    assert own.attrs["data_source"] == str(tmp_path / f"mine{suffix}")
    assert config.from_text(own.attrs["spec"], "spec").data.path == str(tmp_path / f"mine{suffix}")


def test_labels_of_any_values_become_the_classes_in_sorted_order_with_their_names():
    (a, b), classes = map_labels([np.array([7, 3, 100, 3]), np.array([100, 7])], None, "t")
    assert classes == ("3", "7", "100") and a.tolist() == [1, 0, 2, 0] and b.tolist() == [2, 1]
    (a,), classes = map_labels([np.array(["cat", "dog", "cat"])], None, "t")
    assert classes == ("cat", "dog") and a.tolist() == [0, 1, 0]
    (a,), classes = map_labels([np.array([0, 1, 1])], ["no", "yes"], "t")
    assert classes == ("no", "yes") and a.tolist() == [0, 1, 1]
    with pytest.raises(DataError, match="labels must be integers or strings"):
        map_labels([np.array([0.5, 1.0])], None, "t")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not a zip"), "cannot read it as npz"),
    (lambda p: np.savez(p, images=np.zeros((4, 8, 8), np.uint8)), "no x_train, y_train, x_test, y_test"),
    (lambda p: np.savez(p, x_train=np.zeros((4, 8, 8), np.int32), y_train=np.zeros(4), x_test=np.zeros((2, 8, 8), np.int32), y_test=np.zeros(2)),
     "images must be uint8 (0..255) or float, got int32"),
    (lambda p: np.savez(p, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(3), x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.zeros(2)),
     "train images are [4, 8, 8, 1] with labels [3]"),
    (lambda p: np.savez(p, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4), x_test=np.zeros((2, 9, 8), np.uint8), y_test=np.zeros(2)),
     "test images are [2, 9, 8, 1]"),
    (lambda p: np.savez(p, x_train=np.full((4, 8, 8), np.nan, np.float32), y_train=np.zeros(4), x_test=np.zeros((2, 8, 8), np.float32), y_test=np.zeros(2)),
     "NaN or infinite"),
], ids=["not npz", "other keys", "int images", "label count", "test shape", "nan"])
def test_a_bad_arrays_file_is_one_line_naming_it_and_leaves_nothing(tmp_path, make, message):
    path = tmp_path / "bad.npz"
    make(path)
    result = fit(FC, *SMALL, "data.name=null", f"data.path={path}", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 1, result.output
    assert str(path) in result.stderr and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_other_key_names_are_mapped_and_keys_or_image_size_where_they_do_not_apply_are_refused(tmp_path):
    x, y, xt, yt = mnist(300, 100)
    np.savez(tmp_path / "d.npz", images=x, labels=y, test_images=xt, test_labels=yt)
    ds = ArrayFile(tmp_path / "d.npz", {"x_train": "images", "y_train": "labels", "x_test": "test_images", "y_test": "test_labels"}).load()
    np.testing.assert_array_equal(ds.x_train, x)
    assert ds.classes == tuple("0123456789")
    keys = "data.keys={x_train: images, y_train: labels, x_test: test_images, y_test: test_labels}"
    common = [FC, "data.name=null", "train.epochs=1", "model.widths=[784,16,10]", "device=cpu", "--runs-dir", tmp_path / "runs"]
    assert fit(*common, f"data.path={tmp_path / 'd.npz'}", keys).exit_code == 0
    result = fit(*common, f"data.path={tmp_path / 'd.npz'}", "data.image_size=14")
    assert result.exit_code == 1 and "data.image_size: applies to a folder of images" in result.stderr
    result = fit(FC, "data.keys={x_train: a}", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and "data.keys: {x_train: a} has no effect here: it applies to a data.path file" in result.stderr
    result = fit(FC, f"data.path={tmp_path / 'd.npz'}", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and "data.name: expected null with data.path" in result.stderr


def test_sample_counts_beyond_the_split_are_refused(tmp_path):
    x, y, xt, yt = mnist(300, 100)
    write_arrays(tmp_path / "d.npz", x, y, xt, yt)
    common = [FC, "data.name=null", f"data.path={tmp_path / 'd.npz'}", "model.widths=[784,16,10]", "device=cpu", "--runs-dir", tmp_path / "runs"]
    result = fit(*common, "data.test_samples=101")
    assert result.exit_code == 2 and "data.test_samples: expected at most 100 (the test images), got 101" in result.stderr
    result = fit(*common, "data.train_samples=5000")
    assert result.exit_code == 2 and "data.train_samples: expected at most 300 (the training images), got 5,000" in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --- any number of classes ------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [4, 100])
def test_a_4_and_a_100_class_dataset_train_export_to_onnx_and_round_trip_the_ticket(tmp_path, n_classes):
    x, y, xt, yt = mnist(3000, 400)
    if n_classes == 4:  # digits 0-3, labelled by name
        names = np.array(["zero", "one", "two", "three"])
        keep, keep_t = y < 4, yt < 4
        x, xt, y, yt = x[keep], xt[keep_t], names[y[keep]], names[yt[keep_t]]
    else:  # 100 classes: the digit and the image's position mod 10
        y, yt = y * 10 + np.arange(len(y)) % 10, yt * 10 + np.arange(len(yt)) % 10
    write_arrays(tmp_path / "d.npz", x, y, xt, yt)
    result = fit(FC, "data.name=null", f"data.path={tmp_path / 'd.npz'}", f"model.widths=[784,64,{n_classes}]", "train.epochs=2",
                 "device=cpu", "--runs-dir", tmp_path, "--name", "r")
    assert result.exit_code == 0, result.output
    run = scoretrain.open_run(tmp_path / "r")
    assert len(run.classes) == n_classes
    if n_classes == 4:
        assert run.classes == ("one", "three", "two", "zero") and run.metrics["test_acc"][-1] > 0.5  # chance: 0.25
    ev = json.loads(runner.invoke(app, ["eval", str(tmp_path / "r"), "--json"]).stdout)
    assert ev["matches_record"] is True
    # ONNX: onnxruntime agrees with eval's predictions on every test image
    ort = pytest.importorskip("onnxruntime", reason="pip install 'scoretrain[onnx]'")
    assert runner.invoke(app, ["export", str(tmp_path / "r"), "--to", str(tmp_path / "r.onnx")]).exit_code == 0
    session = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": xt.astype(np.float32) / np.float32(255)})[0]
    assert logits.shape == (len(xt), n_classes)
    np.testing.assert_array_equal(logits.argmax(1), run.predict(xt))
    assert (run.predict(xt) == ArrayFile(tmp_path / "d.npz").load().y_test).mean() == ev["test_acc"]
    # the ticket: kilobytes, and eval of it reproduces the run
    assert runner.invoke(app, ["export", str(tmp_path / "r"), "--to", str(tmp_path / "r.ticket")]).exit_code == 0
    ticket = json.loads(runner.invoke(app, ["eval", str(tmp_path / "r.ticket"), "--json"]).stdout)
    assert ticket["test_acc"] == ev["test_acc"] and ticket["matches_record"] is True


# --- your network ---------------------------------------------------------------------------

CUSTOM_CNN = ("model.layers=[{conv: {channels: 8, kernel: 3}}, {batchnorm: {affine: true}}, relu, {avgpool: 2},"
              " {conv: {channels: 16, kernel: 3, stride: 2, k: 0.3}}, relu, {maxpool: 2}, flatten, {linear: 32}, relu, linear]")
RESNET14 = ["model.arch=resnet14", "model.width=0.25", "model.bn=nonaffine"]


@pytest.mark.parametrize("net", ["cnn", "resnet14"])
def test_a_custom_cnn_and_a_resnet_of_a_new_depth_train_eval_reproduces_and_exports_agree(tmp_path, net, monkeypatch):
    x, y, xt, yt = mnist(1500, 300)
    write_arrays(tmp_path / "d.npz", x, y, xt, yt)
    spec = [CUSTOM_CNN] if net == "cnn" else RESNET14
    result = fit(FC, "data.name=null", f"data.path={tmp_path / 'd.npz'}", *spec, "train.epochs=1", "train.batch_size=100",
                 "device=cpu", "--runs-dir", tmp_path, "--name", "r")
    assert result.exit_code == 0, result.output
    run = scoretrain.open_run(tmp_path / "r")
    layers = run.spec.model.layers  # the resolved spec holds the network written out
    if net == "cnn":
        assert run.spec.model.arch == "custom" and layers[0] == {"conv": {"channels": 8, "kernel": 3, "stride": 1, "padding": 1}}
        second = run.layers[1]
        assert second.mask.sum() == round(0.3 * second.weight.size)  # its own k
        assert run.layers[0].mask.sum() == round(0.5 * run.layers[0].weight.size)  # model.k
    else:
        blocks = [l for l in layers if isinstance(l, dict) and "residual" in l]
        assert len(blocks) == 6 and len(run.layers) == 1 + 6 * 2 + 2 + 1  # stem, 2 convs per block, 2 projections, classifier
    ev = json.loads(runner.invoke(app, ["eval", str(tmp_path / "r"), "--json"]).stdout)
    assert ev["matches_record"] is True and ev["masks_match_scores"] is True
    predicted = run.predict(xt)
    assert (predicted == yt).mean() == ev["test_acc"]
    ort = pytest.importorskip("onnxruntime", reason="pip install 'scoretrain[onnx]'")
    assert runner.invoke(app, ["export", str(tmp_path / "r"), "--to", str(tmp_path / "r.onnx")]).exit_code == 0
    session = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"images": xt.astype(np.float32) / np.float32(255)})[0].argmax(1), predicted)
    pytest.importorskip("torch", reason="torch is not installed (it is no dependency of scoretrain)")
    import re

    import torch

    doc = (ROOT / "docs/run-format.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc[doc.index("### PyTorch's pruning convention"):], re.S).group(1)
    assert runner.invoke(app, ["export", str(tmp_path / "r"), "--to", str(tmp_path / "subnet.safetensors"), "--layout", "torch-prune"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    space = {}
    exec(code, space)
    with torch.no_grad():
        np.testing.assert_array_equal(space["predict"](xt), predicted)


@pytest.mark.parametrize("layers, message", [
    ("[conv]", "model.layers[0] (conv): channels expected a positive integer, got None"),
    ("[flatten, {conv: 8}, linear]", "model.layers[1] (conv): needs images [H, W, C], but its input is [784] (after a flatten or a linear layer)"),
    ("[{linear: 10}]", "model.layers[0] (linear): needs a vector, but its input is [28, 28, 1]: put a flatten or a global_avg_pool before it"),
    ("[{maxpool: 2}, {maxpool: 2}, {maxpool: 2}, {maxpool: 8}, flatten, linear]", "model.layers[3] (maxpool 8x8): larger than its input [3, 3, 1]"),
    ("[{conv: {channels: 4, kernel: 31, padding: 0}}, flatten, linear]", "model.layers[0] (conv 31x31, padding 0): larger than its padded input [28, 28, 1]"),
    ("[flatten, {linear: 32}]", "model.layers: the network's output is [32], expected [10] (the classes of the data): end with a linear layer of 10 units (units: null)"),
    ("[flatten, {dense: 3}]", "model.layers[1]: unknown layer 'dense' (known: linear, conv, batchnorm, relu, maxpool, avgpool, global_avg_pool, flatten, residual)"),
    ("[flatten, {linear: {units: 3, kk: 1}}]", "model.layers[1] (linear): unknown parameter 'kk' (known: units, k)"),
    ("[flatten, {linear: {k: 1.5}}]", "model.layers[1] (linear): k expected a fraction in (0, 1] or null, got 1.5"),
    ("[relu: 3]", "model.layers[0]: relu takes no parameters, got 3"),
], ids=["conv without channels", "conv after flatten", "linear on images", "pool too large", "kernel too large",
        "wrong output", "unknown layer", "unknown parameter", "bad k", "params to relu"])
def test_a_layer_that_cannot_follow_the_one_before_is_one_line_naming_it(layers, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, [f"model.layers={layers}"])
    assert str(e.value) == message


def test_every_preset_is_a_layer_list_in_the_resolved_spec_and_an_edited_one_is_refused():
    for arch in ["mlp", "lenet", "conv2", "conv4", "conv6", "conv8", "resnet20", "resnet32", "resnet56", "resnet18", "wrn28", "resnet8", "wrn16"]:
        cfg = config.load(None, [f"model.arch={arch}"] + ([] if arch == "mlp" else ["data.name=cifar10"]))
        again = config.from_text(config.dump(cfg), "spec")  # a run's own spec loads back as it was
        assert again == cfg and isinstance(cfg.model.layers, list) and cfg.model.layers[-1] == {"linear": {"units": 10}}
    with pytest.raises(ConfigError, match="model.layers: differs from the layers of model.arch lenet"):
        config.load(None, ["model.arch=lenet", "model.layers=[flatten, linear]"])
    with pytest.raises(ConfigError, match=r"model.arch: expected one of .* got 'resnet21'"):
        config.load(None, ["model.arch=resnet21"])
    with pytest.raises(ConfigError, match="model.layers: expected no layer's own k with model.k_scope: global"):
        config.load(None, ["model.layers=[flatten, {linear: {units: 10, k: 0.2}}]", "model.k_scope=global"])


# --- what a run trained on ------------------------------------------------------------------


def test_the_run_records_its_data_and_eval_and_resume_refuse_other_data_while_eval_data_measures_on_it(tmp_path):
    x, y, xt, yt = mnist(600, 200)
    write_arrays(tmp_path / "d.npz", x, y, xt, yt)
    result = fit(FC, "data.name=null", f"data.path={tmp_path / 'd.npz'}", "model.widths=[784,32,10]", "train.epochs=1", "device=cpu",
                 "--runs-dir", tmp_path, "--name", "r")
    assert result.exit_code == 0, result.output
    attrs = store.load(tmp_path / "r").attrs
    assert list(attrs["data_image_shape"]) == [28, 28, 1] and [str(c) for c in attrs["data_classes"]] == list("0123456789")
    assert len(attrs["data_digest"]) == 64
    # other images at the same path: eval refuses, in one line
    write_arrays(tmp_path / "d.npz", x, y, xt[::-1], yt[::-1])
    result = runner.invoke(app, ["eval", str(tmp_path / "r")])
    assert result.exit_code == 1 and "is not what the run trained on" in result.stderr and "Traceback" not in result.stderr
    # eval --data: the same kind of data elsewhere is measured, with the run's standardization
    x2, y2, xt2, yt2 = mnist(1000, 1000)
    write_arrays(tmp_path / "other.npz", x2, y2, xt2[500:], yt2[500:])
    out = json.loads(runner.invoke(app, ["eval", str(tmp_path / "r"), "--data", str(tmp_path / "other.npz"), "--json"]).stdout)
    run = scoretrain.open_run(tmp_path / "r")
    assert out["test_samples"] == 500 and out["test_acc"] == (run.predict(xt2[500:]) == yt2[500:]).mean()
    assert out["matches_record"] is None and out["data"] == str(tmp_path / "other.npz")
    # --data of other classes is refused
    keep = y2 < 5
    write_arrays(tmp_path / "five.npz", x2[keep], y2[keep], xt2[yt2 < 5], yt2[yt2 < 5])
    result = runner.invoke(app, ["eval", str(tmp_path / "r"), "--data", str(tmp_path / "five.npz")])
    assert result.exit_code == 1 and "must have the same image shape and classes" in result.stderr


def test_a_resume_on_other_data_is_refused(tmp_path):
    from conftest import stopped_run

    x, y, xt, yt = mnist(2000, 500)
    write_arrays(tmp_path / "d.npz", x, y, xt, yt)
    run_dir = stopped_run(tmp_path, ["data.name=null", f"data.path={tmp_path / 'd.npz'}", "model.widths=[784,64,10]", "device=cpu"], after=1)
    write_arrays(tmp_path / "d.npz", x[::-1], y[::-1], xt, yt)
    before = arrays_digest(run_dir)
    result = runner.invoke(app, ["fit", "--resume", str(run_dir)])
    assert result.exit_code == 1 and "is not what the run trained on" in result.stderr
    assert arrays_digest(run_dir) == before


# --- from Python ----------------------------------------------------------------------------


def test_fit_takes_a_dict_and_arrays_and_the_run_predicts_as_eval_measures(tmp_path):
    x, y, xt, yt = mnist(800, 200)
    labels = np.array(["even", "odd"])
    data = {"x_train": x, "y_train": labels[y % 2], "x_test": xt, "y_test": labels[yt % 2]}
    run = scoretrain.fit({"model": {"widths": [784, 32, 2]}, "train": {"epochs": 2}, "device": "cpu"}, data=data,
                         runs_dir=tmp_path, name="parity")
    assert run.classes == ("even", "odd") and run.status == "completed"
    assert Path(run.spec.data.path).is_file() and run.spec.data.name is None  # the arrays, kept where the spec says
    logits = run.logits(xt)
    assert logits.shape == (200, 2) and logits.dtype == np.float32
    assert (run.predict(xt) == yt % 2).mean() == run.evaluate()["test_acc"] == run.metrics["test_acc"][-1]
    with pytest.raises(DataError, match=r"images: expected \[N, 28, 28, 1\]"):
        run.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="data: unknown key 'x_tain'"):
        scoretrain.fit(None, data={"x_tain": x}, runs_dir=tmp_path)
    assert {"fit", "resume", "open_run", "open_ticket", "measure", "RunRecord"} <= set(dir(scoretrain))


def test_mnist_as_a_folder_of_pngs_trains_to_the_bits_of_its_arrays_in_imagefolders_order(tmp_path):
    """Class folders 0..9 of PNGs: loaded in torchvision's ImageFolder order (class by name, then
    file by name), the run is the run of the same arrays in that order, bit for bit."""
    Image = pytest.importorskip("PIL.Image", reason="pip install 'scoretrain[images]'")
    x, y, xt, yt = mnist(400, 100)
    for split, images, labels in (("train", x, y), ("test", xt, yt)):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = tmp_path / "pngs" / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[..., 0]).save(folder / f"{i:05d}.png")
    order, order_t = np.argsort(y, kind="stable"), np.argsort(yt, kind="stable")  # file names keep each class's order
    write_arrays(tmp_path / "sorted.npz", x[order], y[order], xt[order_t], yt[order_t])
    common = [FC, "data.name=null", "model.widths=[784,64,10]", "train.epochs=1", "train.batch_size=50", "device=cpu",
              "--runs-dir", tmp_path]
    assert fit(*common, f"data.path={tmp_path / 'pngs'}", "--name", "folder").exit_code == 0
    assert fit(*common, f"data.path={tmp_path / 'sorted.npz'}", "--name", "arrays").exit_code == 0
    assert arrays_digest(tmp_path / "folder") == arrays_digest(tmp_path / "arrays")
    a, b = store.load(tmp_path / "folder").attrs, store.load(tmp_path / "arrays").attrs
    assert a["data_digest"] == b["data_digest"]  # the same arrays, whichever source gave them
    # the first images of a folder are its first classes: a subset that misses classes says so
    result = fit(*common, f"data.path={tmp_path / 'pngs'}", "data.train_samples=30", "--name", "few")
    assert result.exit_code == 0 and "note: the first 30 train images (data.train_samples) hold 1 of the 10 classes" in result.stderr
