"""The conv engines (kernels/conv_engine.py, train.conv_engine) against the im2col reference: every
conv shape of the shipped configs and random shapes, outputs and both gradients within 1e-5
relative (per tensor, in the norm); the same bits on a rerun; gradients through the engine
against finite differences; the engine's calls on the strict CuPy stand-in (no host reads, no
CUDA graph capture); choosing an engine, recording it, and resuming on another. The torch tests
skip where PyTorch is not installed."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import for_arch, merged
from typer.testing import CliRunner

from scoretrain.cli import app
from scoretrain.errors import ConfigError
from scoretrain.kernels import conv_engine
from scoretrain.nn.layers import Conv2d
from scoretrain.nn.model import build_layers
from scoretrain.run import config as config_mod
from scoretrain.run import environment, store

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
IMAGE = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}  # the shipped configs' datasets
runner = CliRunner()
FC = str(Path(__file__).resolve().parent.parent / "configs/mnist_fc.yaml")


def torch_engine(xp=np):
    """The torch engine on `xp` (the stand-in: DLPack, as CuPy), or a skip where PyTorch is missing."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the extra scoretrain[torch])")
    return conv_engine.Torch(xp, torch)


class Recorder(conv_engine.Im2col):
    """im2col, noting every conv it computes with the shape of its input."""

    def __init__(self):
        self.seen = {}

    def forward(self, conv, x, w):
        self.seen[(conv.shape, conv.stride, conv.pad, x.shape[1:])] = conv
        return super().forward(conv, x, w)


def preset_shapes() -> list:
    """(conv, per-sample input shape) for every distinct conv of the shipped configs."""
    recorder = Recorder()
    for path in CONFIGS:
        cfg = config_mod.load(path, [])
        shape = IMAGE[cfg.data.name or "mnist"]
        layers = build_layers(np, cfg.model, shape, 10)
        if cfg.model.arch in (None, "mlp"):
            continue
        x = np.zeros((1, *shape), np.float32)
        with conv_engine.using(recorder):
            for layer in layers:  # one sample forward, zero weights: only the shapes matter
                x = layer.forward(x, _zeros(layers), True)[0]
    return [(conv, key[3]) for key, conv in recorder.seen.items()]


def _zeros(layers):
    from scoretrain.nn.layers import weight_layers

    return [np.zeros(l.shape, np.float32) for l in weight_layers(layers)]


def random_shapes(n=24, seed=0) -> list:
    """Convs of random channels, kernel, stride and padding, on random (non-square) images."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        c_in, c_out, k, stride = int(rng.integers(1, 25)), int(rng.integers(1, 25)), int(rng.choice([1, 2, 3, 4, 5, 7])), int(rng.integers(1, 4))
        pad = int(rng.integers(0, k + 1))
        h, w = int(rng.integers(1, 18)), int(rng.integers(1, 18))
        if h + 2 * pad >= k and w + 2 * pad >= k:
            conv = Conv2d(np, c_in, c_out, k, stride, pad)
            out.append((conv, (h, w, c_in)))
    return out


def run(engine, conv, x, w, d):
    """(y, dx, dw) of `conv` on `engine`: a forward, then a backward of d."""
    conv.index = 0
    with conv_engine.using(engine):
        y, cache = conv.forward(x, [w], True)
    dw = [np.full_like(w, np.nan)]
    dx = conv.backward(d, cache, [w], dw, True)
    return np.array(y), np.array(dx), dw[0]


def inputs(conv, shape, batch, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *shape)).astype(dtype)
    w = rng.standard_normal(conv.shape).astype(dtype)
    d = rng.standard_normal((batch, *conv.output_shape(shape)[0])).astype(dtype)
    return x, w, d


def relative(a, b) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(a.ravel()), 1e-30))


def test_the_presets_have_their_conv_shapes():
    """What the comparisons below cover: strided and 1x1 projection convs, 5x5 LeNet convs, and
    the 3-channel CIFAR stems."""
    shapes = preset_shapes()
    assert len(shapes) >= 20
    assert any(c.k == 1 and c.stride == 2 for c, _ in shapes) and any(c.k == 5 for c, _ in shapes)
    assert any(s == (32, 32, 3) for _, s in shapes) and any(s == (28, 28, 1) for _, s in shapes)


@pytest.mark.parametrize("shapes", ["presets", "random"])
def test_the_torch_engine_matches_im2col_within_1e_5(shapes):
    engine = torch_engine()
    cases = preset_shapes() if shapes == "presets" else random_shapes()
    for i, (conv, shape) in enumerate(cases):
        x, w, d = inputs(conv, shape, batch=2 if shapes == "presets" else 3, seed=i)
        ref, got = run(conv_engine.IM2COL, conv, x, w, d), run(engine, conv, x, w, d)
        for name, a, b in zip(("y", "dx", "dw"), ref, got):
            assert a.shape == b.shape and b.dtype == np.float32, (name, conv.shape, shape)
            assert relative(a, b) <= 1e-5, f"{name} of conv {conv.shape} stride {conv.stride} pad {conv.pad} on {shape}: {relative(a, b):.2e}"


def test_the_torch_engine_gives_the_same_bits_on_a_rerun():
    """At a training batch (128: the threads split the work), every preset shape twice, from copies."""
    engine = torch_engine()
    for i, (conv, shape) in enumerate(preset_shapes()[:12]):
        x, w, d = inputs(conv, shape, batch=128 if shape[0] <= 16 else 32, seed=i)
        first = run(engine, conv, x.copy(), w.copy(), d.copy())
        again = run(engine, conv, x.copy(), w.copy(), d.copy())
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("k, stride, pad", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (5, 1, 2), (4, 3, 2)])
def test_the_torch_engine_gradients_match_finite_differences(k, stride, pad):
    """float64, every element of x and w: d/dv sum(conv(x, w) * G) by central differences."""
    engine = torch_engine()
    conv = Conv2d(np, 3, 4, k, stride, pad)
    x, w, g = inputs(conv, (7, 6, 3), batch=2, seed=k, dtype=np.float64)
    _, dx, dw = run(engine, conv, x, w, g)

    def loss(xv, wv):
        with conv_engine.using(engine):
            return float((conv.forward(xv, [wv], True)[0] * g).sum())

    eps = 1e-6
    for base, got, of in ((x, dx, lambda v: loss(v, w)), (w, dw, lambda v: loss(x, v))):
        for idx in np.ndindex(base.shape):
            up, down = base.copy(), base.copy()
            up[idx] += eps
            down[idx] -= eps
            assert got[idx] == pytest.approx((of(up) - of(down)) / (2 * eps), rel=1e-6, abs=1e-7)


def test_the_torch_engine_on_the_cupy_stand_in_reads_nothing_back():
    """On CuPy the engine hands the arrays to PyTorch through DLPack and takes its results back the
    same way: on the stand-in (NumPy memory with CuPy's rules) every result is a device array of
    the layout the layers hold, the values the CPU's, and no call reads the device from the host
    (the stand-in raises where one would)."""
    from support.strict_cupy import DeviceArray, StrictCupy

    xp = StrictCupy(kernels=False)
    engine = torch_engine(xp)
    conv, host = Conv2d(xp, 4, 6, 3, 2, 1), Conv2d(np, 4, 6, 3, 2, 1)
    x, w, d = inputs(host, (9, 8, 4), batch=3, seed=0)
    conv.index = 0
    with conv_engine.using(engine):
        y, cache = conv.forward(xp.asarray(x), [xp.asarray(w)], True)
    dw = [xp.zeros(w.shape, np.float32)]
    dx = conv.backward(xp.asarray(d), cache, [xp.asarray(w)], dw, True)
    assert all(isinstance(a, DeviceArray) and a.flags.c_contiguous for a in (y, dx, dw[0]))
    assert y.shape == (3, 5, 4, 6) and dx.shape == x.shape
    for a, b in zip((y, dx, dw[0]), run(torch_engine(), host, x, w, d)):
        assert a.get().tobytes() == b.tobytes()


def test_the_torch_engine_refuses_a_cuda_graph_capture_and_the_step_runs_without_one(capsys):
    """PyTorch's allocator cannot run inside CuPy's capture: the engine raises before it launches
    anything, and step.CapturedStep runs the step as it is, with its one-line note, to the bits of
    the step that was never captured."""
    from test_graph import assert_same, train

    from scoretrain.run.step import CapturedStep, EagerStep
    from support.strict_cupy import StrictCupy

    variant = dict(arch="resnet20", width=0.125, bn="nonaffine")
    with conv_engine.using(torch_engine(StrictCupy(kernels=False))):  # (the engine's xp is only what it hands back)
        eager = train(variant, lambda net, opt, xp: EagerStep(net, opt), epochs=1, xp=StrictCupy(kernels=False))
        fallen = train(variant, lambda net, opt, xp: CapturedStep(net, opt, xp), epochs=1, xp=StrictCupy(kernels=False))
    assert_same(eager, fallen)
    assert fallen[3].failed and not fallen[3].graphs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CaptureRefused" in err[0] and err[0].startswith("note: the training step cannot be captured")


def test_auto_takes_im2col_where_torch_is_missing_and_torch_named_is_one_line(monkeypatch):
    monkeypatch.setattr(conv_engine, "_torch_engine", lambda xp: (None, "PyTorch is not installed"))
    assert conv_engine.resolve("auto", np) is conv_engine.IM2COL
    assert conv_engine.resolve("im2col", np) is conv_engine.IM2COL
    with pytest.raises(ConfigError) as e:
        conv_engine.resolve("torch", np)
    message = str(e.value)
    assert "\n" not in message and message.startswith("train.conv_engine: torch: PyTorch is not installed")
    assert "scoretrain[torch]" in message and "im2col" in message


def test_auto_keeps_im2col_on_a_gpu():
    """CuPy's step is replayed as CUDA graphs, which the torch engine cannot join."""
    from support.strict_cupy import StrictCupy

    assert conv_engine.resolve("auto", StrictCupy()) is conv_engine.IM2COL


def test_a_network_built_outside_a_run_computes_with_im2col():
    assert conv_engine.current() is conv_engine.IM2COL
    with conv_engine.using(conv_engine.Im2col()) as engine:
        assert conv_engine.current() is engine
    assert conv_engine.current() is conv_engine.IM2COL


def test_fit_with_a_missing_engine_refuses_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, small):
    monkeypatch.setattr(conv_engine, "_torch_engine", lambda xp: (None, "PyTorch is not installed"))
    conv = ["model.arch=lenet", "model.width=0.125", "train.conv_engine=torch"]  # a network with convs
    result = runner.invoke(app, ["fit", str(CONFIGS[0].parent / "mnist_fc.yaml"), *merged(for_arch(small, conv), conv),
                                 "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "train.conv_engine: torch: PyTorch is not installed" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_run_records_its_engine_and_a_resume_on_another_says_so(tmp_path, small):
    """run.h5 names the engine with its library's version and threads; a resume that computes the
    convs with another engine says so in one line (the same code and seed give other bits)."""
    from conftest import stopped_run

    engine = torch_engine()
    run_dir = stopped_run(tmp_path, small, "model.arch=lenet", "model.width=0.125", "train.conv_engine=torch")
    envs = store.environments(store.load(run_dir))
    assert envs[0]["conv_engine"] == engine.describe() and "oneDNN" in envs[0]["conv_engine"]
    spec = (run_dir / store.CONFIG_FILE).read_text().replace("conv_engine: torch", "conv_engine: im2col")
    (run_dir / store.CONFIG_FILE).write_text(spec)
    result = runner.invoke(app, ["fit", "--resume", str(run_dir), "-q"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"conv_engine {engine.describe()} -> im2col" in notes[0]
    assert store.environments(store.load(run_dir))[1]["conv_engine"] == "im2col"
    # a network without convs runs none of the engine's code, and records im2col
    assert runner.invoke(app, ["fit", FC, *merged(small, ["train.epochs=1", "train.conv_engine=torch"]), "--runs-dir", str(tmp_path), "--name", "mlp"]).exit_code == 0
    assert store.environments(store.load(tmp_path / "mlp"))[0]["conv_engine"] == "im2col"


def test_a_record_from_before_the_engines_counts_as_im2col():
    """Runs recorded before run.h5 named the engine computed with im2col: resuming one on im2col
    says nothing, on another engine it says so."""
    old = {k: "same" for k in environment.BITS if k != "conv_engine"}
    assert environment.differences(old, dict(old, conv_engine="im2col")) == []
    assert environment.differences(old, dict(old, conv_engine="torch 2.13.0")) == ["conv_engine im2col -> torch 2.13.0"]


def test_bench_net_shows_the_engine(tmp_path):
    engine = torch_engine()
    result = runner.invoke(app, ["bench", "--net", "lenet", "--quick", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert f"conv engine {engine.describe()}" in result.output and "conv forward" in result.output


def test_bench_net_takes_another_engine_and_refuses_a_wrong_one(tmp_path):
    result = runner.invoke(app, ["bench", "--net", "lenet", "--quick", "--device", "cpu", "--conv-engine", "im2col",
                                 "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "conv engine im2col" in result.output
    assert json.loads((tmp_path / "b.json").read_text())["net"]["conv_engine"] == "im2col"
    for args in (["--net", "lenet", "--conv-engine", "cudnn"], ["--conv-engine", "im2col"]):
        result = runner.invoke(app, ["bench", *args, "--device", "cpu", "--json", str(tmp_path / "c.json")])
        assert result.exit_code == 2 and "--conv-engine: expected one of auto, im2col, torch" in result.output
        assert "Traceback" not in result.output and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("bn", ["nonaffine", "affine", "none"])
def test_a_residual_blocks_fused_passes_give_the_bits_of_its_layers_one_by_one(bn):
    """BatchNorm + ReLU in one pass, the sum + ReLU in another, the gradients summed in place: the
    bits of each layer's own forward and backward (a layer given its own forward is not fused)."""
    from scoretrain.nn.layers import ReLU, ResidualBlock, norm_layers, walk, weight_layers

    def step(fuse):
        block = ResidualBlock(np, 4, 8, 2, bn)
        for i, l in enumerate(weight_layers([block])):
            l.index = i
        for n in norm_layers([block]):
            if n.affine:
                n.gamma, n.beta, n.dgamma, n.dbeta = (np.linspace(0.5, 1.5, 8, dtype=np.float32), np.full(8, 0.1, np.float32),
                                                      np.zeros(8, np.float32), np.zeros(8, np.float32))
        if not fuse:
            for l in walk([block]):
                if isinstance(l, ReLU) or hasattr(l, "affine"):
                    l.forward = l.forward  # its own code, given to the object: not fused
            block.relu.forward = block.relu.forward
        rng = np.random.default_rng(0)
        w = [rng.standard_normal(l.shape).astype(np.float32) for l in weight_layers([block])]
        x = rng.standard_normal((16, 10, 10, 4)).astype(np.float32)
        y, cache = block.forward(x, w, True)
        grads = [np.zeros_like(a) for a in w]
        dx = block.backward(rng.standard_normal(y.shape).astype(np.float32), cache, w, grads, True)
        return [np.array(y), dx, *grads] + [s for n in norm_layers([block]) for s in (n.mean, n.var)]

    for a, b in zip(step(True), step(False), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.gpu
def test_the_torch_engine_on_a_gpu_matches_im2col_and_reruns_to_its_bits():
    """cuDNN through DLPack, deterministic algorithms, on CuPy's stream: every preset shape within
    1e-5 of im2col + cuBLAS, and the same bits twice."""
    cp = pytest.importorskip("cupy", reason="CuPy is not installed")
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the extra scoretrain[torch])")
    if not torch.cuda.is_available() or cp.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no CUDA device for PyTorch and CuPy")
    engine = conv_engine.resolve("torch", cp)
    for i, (host, shape) in enumerate(preset_shapes()):
        conv = Conv2d(cp, host.shape[3], host.shape[0], host.k, host.stride, host.pad)
        conv.index = 0
        x, w, d = (cp.asarray(a) for a in inputs(host, shape, batch=8, seed=i))
        outs = []
        for e in (conv_engine.IM2COL, engine, engine):
            with conv_engine.using(e):
                y, cache = conv.forward(x, [w], True)
            dw = [cp.zeros_like(w)]
            dx = conv.backward(d, cache, [w], dw, True)
            outs.append([a.get() for a in (y, dx, dw[0])])
        for a, b, c in zip(*outs):
            assert relative(a, b) <= 1e-5 and b.tobytes() == c.tobytes()


def test_a_strided_1x1_conv_runs_on_im2col_under_the_torch_engine():
    """PyTorch 2.13's CPU backward of this 1x1 stride-2 conv (a projection shortcut of resnet18 at
    width 0.0625, batch 25) crashes the process: the engine computes it with im2col, bit for bit."""
    engine = torch_engine()
    conv = Conv2d(np, 8, 16, 1, 2, pad=0)
    r = np.random.default_rng(0)
    x, w = r.standard_normal((25, 16, 16, 8)).astype(np.float32), r.standard_normal(conv.shape).astype(np.float32)
    y, kept = engine.forward(conv, x, w)
    y_ref, kept_ref = conv_engine.IM2COL.forward(conv, x, w)
    np.testing.assert_array_equal(y, y_ref)
    d = r.standard_normal(y.shape).astype(np.float32)
    dw, dw_ref = np.empty_like(w), np.empty_like(w)
    np.testing.assert_array_equal(engine.backward(conv, d, kept, w, dw, True), conv_engine.IM2COL.backward(conv, d, kept_ref, w, dw_ref, True))
    np.testing.assert_array_equal(dw, dw_ref)
