"""Residual nets and their layers: BatchNorm (training and measuring), strided and 1x1 convs,
global average pooling and residual blocks against finite differences; the resnet archs' shapes;
BatchNorm's running statistics stored in run.h5, so that `eval` reproduces the record and a
resumed run its bits."""

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from scoretrain.nn import layers
from scoretrain.run import config as config_mod
from scoretrain.run import store
from scoretrain.cli import app
from scoretrain.run.config import ModelConfig
from scoretrain.nn.layers import BatchNorm, Conv2d, GlobalAvgPool, MaxPool2d, ResidualBlock, weight_layers
from scoretrain.nn.model import Network, build_layers, cross_entropy, init_network

from conftest import FC, assert_identical, stopped_run


def check_layer(layer, x, weights=(), train=True, rtol=1e-6, samples=None, seed=0):
    """backward() of sum(forward(x) * G) against central differences, for x and each weight."""
    rng = np.random.default_rng(seed)
    w_eff = [np.array(w) for w in weights]
    y, _ = layer.forward(x.copy(), w_eff, train)
    G = rng.standard_normal(y.shape)

    def loss(xv, wv):
        state = [(n.mean.copy(), n.var.copy()) for n in _norms(layer)]  # a probe must not move the running statistics
        out = float((layer.forward(xv.copy(), wv, train)[0] * G).sum())
        for n, (m, v) in zip(_norms(layer), state):
            n.mean[...], n.var[...] = m, v
        return out

    grads = [np.zeros_like(w) for w in w_eff]
    _, cache = layer.forward(x.copy(), w_eff, train)
    dx = layer.backward(G.copy(), cache, w_eff, grads, True)
    eps = 1e-6
    for target, got in [("x", dx)] + [(i, g) for i, g in enumerate(grads)]:
        base = x if target == "x" else w_eff[target]
        idxs = list(np.ndindex(base.shape))
        if samples and len(idxs) > samples:
            idxs = [idxs[i] for i in rng.choice(len(idxs), samples, replace=False)]
        for idx in idxs:
            up, down = base.copy(), base.copy()
            up[idx] += eps
            down[idx] -= eps
            if target == "x":
                num = (loss(up, w_eff) - loss(down, w_eff)) / (2 * eps)
            else:
                wu, wd = list(w_eff), list(w_eff)
                wu[target], wd[target] = up, down
                num = (loss(x, wu) - loss(x, wd)) / (2 * eps)
            assert got[idx] == pytest.approx(num, rel=rtol, abs=1e-7), f"d{target}{idx}"


def _norms(layer):
    return [l for l in [layer, *getattr(layer, "children", [])] if isinstance(l, BatchNorm)]


def numbered(layer):
    for i, l in enumerate(weight_layers([layer])):
        l.index = i
    return layer


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_gradient_in_training_and_measuring(train):
    rng = np.random.default_rng(1)
    bn = BatchNorm(np, 3)
    bn.mean[...], bn.var[...] = [0.1, -0.2, 0.3], [0.5, 2.0, 1.5]
    check_layer(bn, rng.standard_normal((4, 5, 5, 3)) * 2 + 1, train=train)


def test_batchnorm_normalizes_by_the_batch_and_moves_its_running_statistics():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 4, 4, 2)) * [3.0, 0.5] + [1.0, -2.0]).astype(np.float32)
    bn = BatchNorm(np, 2)
    y, _ = bn.forward(x.copy(), [], True)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1, rtol=1e-3)
    n = x.size // 2
    np.testing.assert_allclose(bn.mean, 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(bn.var, 0.9 + 0.1 * x.var(axis=(0, 1, 2)) * n / (n - 1), rtol=1e-5)
    measured, _ = bn.forward(x.copy(), [], False)  # the running statistics, not the batch's
    np.testing.assert_allclose(measured, (x - bn.mean) / np.sqrt(bn.var + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("k, stride, pad", [(3, 2, 1), (1, 1, 0), (1, 2, 0), (3, 1, 1), (5, 2, 2), (3, 1, 0), (5, 1, 1)])
@pytest.mark.parametrize("c_in, c_out", [(2, 3), (3, 2)])  # dx by col2im; at stride 1, by the flipped kernel
def test_strided_and_1x1_conv_gradients(k, stride, pad, c_in, c_out):
    rng = np.random.default_rng(k * 10 + stride)
    conv = numbered(Conv2d(np, c_in, c_out, k, stride, pad))
    x = rng.standard_normal((2, 7, 6, c_in))
    w = rng.standard_normal(conv.shape)
    y, _ = conv.forward(x.copy(), [w], True)
    assert y.shape[1:] == conv.output_shape((7, 6, c_in))[0] == ((7 + 2 * pad - k) // stride + 1, (6 + 2 * pad - k) // stride + 1, c_out)
    check_layer(conv, x, [w])


def test_strided_conv_equals_the_stride_1_conv_subsampled():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 8, 8, 3)), rng.standard_normal((4, 3, 3, 3))
    full, _ = numbered(Conv2d(np, 3, 4, 3)).forward(x.copy(), [w], True)
    strided, _ = numbered(Conv2d(np, 3, 4, 3, 2)).forward(x.copy(), [w], True)
    np.testing.assert_allclose(strided, full[:, ::2, ::2], rtol=1e-12)


def test_global_average_pool_gradient():
    check_layer(GlobalAvgPool(np), np.random.default_rng(4).standard_normal((3, 4, 5, 2)))


@pytest.mark.parametrize("c_in, c_out, stride, bn", [(3, 3, 1, "nonaffine"), (3, 5, 2, "nonaffine"), (3, 5, 1, "none"), (4, 4, 2, "none")])
def test_residual_block_gradients(c_in, c_out, stride, bn):
    rng = np.random.default_rng(c_in + c_out + stride)
    block = numbered(ResidualBlock(np, c_in, c_out, stride, bn))
    assert bool(block.shortcut) == (stride != 1 or c_in != c_out)  # a projection only where the shape changes
    weights = [rng.standard_normal(l.shape) * 0.5 for l in weight_layers([block])]
    check_layer(block, rng.standard_normal((3, 6, 6, c_in)), weights, samples=12)


@pytest.mark.parametrize("arch, depth, channels", [("resnet20", 20, [16, 32, 64]), ("resnet32", 32, [16, 32, 64]),
                                                   ("resnet56", 56, [16, 32, 64]), ("resnet18", 18, [64, 128, 256, 512]),
                                                   ("wrn28", 26, [16, 32, 64])])
def test_resnet_archs_have_their_depth_and_widths(arch, depth, channels):
    layers = build_layers(np, ModelConfig(arch=arch, bn="nonaffine"), (32, 32, 3), 10)
    ws = weight_layers(layers)
    projections = sum(1 for l in ws if getattr(l, "k", None) == 1)
    assert len(ws) - projections == depth  # convs and the classifier; the 1x1 shortcuts are not counted in the name
    assert sorted({l.shape[0] for l in ws[:-1]}) == channels
    assert ws[-1].shape == (10, channels[-1])
    shape = (32, 32, 3)
    for l in layers:
        shape, _ = l.output_shape(shape)
    assert shape == (10,)
    half = weight_layers(build_layers(np, ModelConfig(arch=arch, width=0.5), (28, 28, 1), 10))
    assert half[-1].shape == (10, channels[-1] // 2)


@pytest.mark.parametrize("method", ["dense", "edge-popup", "biprop", "iterand"])
def test_a_small_resnet_gradient_end_to_end(method):
    """dL/dW_eff of a whole resnet20 (width 0.25, non-affine BN) by finite differences at a few
    entries of every weight layer, in training mode."""
    cfg = ModelConfig(method=method, arch="resnet20", width=0.25, bn="nonaffine", k=0.5, init="kaiming_normal")
    w, s = init_network(cfg, 0, (8, 8, 2), 3)
    net = Network(np, cfg, [a.astype(np.float64) for a in w], None if s is None else [a.astype(np.float64) for a in s], (8, 8, 2), 3)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 8, 8, 2)), rng.integers(0, 3, 6)
    w_eff = [a.copy() for a in net.effective_weights(True)]
    state = net.norm_state()
    logits, caches = net.forward(x.copy(), w_eff)
    net.backward(caches, w_eff, cross_entropy(np, logits, y)[2])

    def loss(probe):
        net.set_norm_state(state)
        out = float(cross_entropy(np, net.forward(x.copy(), probe)[0], y)[0]) / len(y)
        return out

    eps = 1e-6
    for layer, g in enumerate(net.grads):
        for flat in rng.choice(g.size, 3, replace=False):
            idx = np.unravel_index(flat, g.shape)
            up, down = [a.copy() for a in w_eff], [a.copy() for a in w_eff]
            up[layer][idx] += eps
            down[layer][idx] -= eps
            assert g[idx] == pytest.approx((loss(up) - loss(down)) / (2 * eps), rel=1e-5, abs=1e-8), f"layer {layer} {idx}"


SMALL_RESNET = ["model.arch=resnet20", "model.width=0.25", "model.bn=nonaffine", "data.train_samples=600",
                "data.test_samples=200", "train.batch_size=100", "train.eval_batch_size=100", "device=cpu"]


def test_fit_stores_the_running_statistics_and_eval_reproduces_the_record(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["fit", FC, *SMALL_RESNET, "train.epochs=2", "--runs-dir", str(tmp_path), "--name", "r", "-q"])
    assert out.exit_code == 0, out.output
    run = store.load(tmp_path / "r")
    n_bn = 1 + 9 * 2 + 2  # the stem's, two per block, one per projection shortcut (stages 2 and 3)
    assert len(run.norms) == n_bn and all(s.shape[0] == 2 for s in run.norms)
    assert not np.allclose(run.norms[0][0], 0)  # the running means moved
    result = runner.invoke(app, ["eval", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"matches_record": true' in result.output
    exported = runner.invoke(app, ["export", str(tmp_path / "r"), "--to", str(tmp_path / "r.npz")])
    assert exported.exit_code == 0, exported.output
    with np.load(tmp_path / "r.npz") as f:
        np.testing.assert_array_equal(f["batchnorm_00"], run.norms[0])
        assert sum(1 for k in f.files if k.startswith("weight_")) == len(run.weights)
    exported = runner.invoke(app, ["export", str(tmp_path / "r"), "--to", str(tmp_path / "r.safetensors")])
    assert exported.exit_code == 0, exported.output
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "r.safetensors")
    assert sum(1 for k in tensors if k.startswith("batchnorm_")) == n_bn
    np.testing.assert_array_equal(tensors["batchnorm_20"], run.norms[20])


@pytest.mark.parametrize("extra", [[], ["train.bn_recalibration=250"]], ids=["moving", "recalibrated"])
def test_a_resumed_resnet_run_is_bit_identical(tmp_path, reference, extra):
    """Stopped after epoch 1 and resumed: the running statistics come back from run.h5 (and a
    recalibration draws the same images again)."""
    args = [*SMALL_RESNET, *extra]
    run_dir = stopped_run(tmp_path, args[:1], *args[1:], after=1)
    out = CliRunner().invoke(app, ["fit", "--resume", str(run_dir)])
    assert out.exit_code == 0, out.output
    assert_identical(run_dir, reference("sgd", *args))
    for a, b in zip(store.load(run_dir).norms, store.load(reference("sgd", *args)).norms):
        np.testing.assert_array_equal(a, b)


def test_recalibration_averages_the_batch_statistics_under_the_measured_mask():
    cfg = ModelConfig(arch="resnet20", width=0.25, bn="nonaffine", k=0.5)
    weights, scores = init_network(cfg, 0, (12, 12, 1), 10)
    net = Network(np, cfg, weights, scores, (12, 12, 1), 10)
    rng = np.random.default_rng(8)
    batches = [rng.standard_normal((n, 12, 12, 1)).astype(np.float32) for n in (20, 20, 12)]
    w_eff = net.effective_weights(train=False)
    net.recalibrate(w_eff, iter(batches))
    stem = [net.layers[0].forward(b, w_eff, True)[0] for b in batches]  # what the first BatchNorm sees
    bn = net.norms[0]
    n = [s.size // bn.c for s in stem]
    np.testing.assert_allclose(bn.mean, np.mean([s.mean(axis=(0, 1, 2)) for s in stem], axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var, np.mean([s.var(axis=(0, 1, 2)) * m / (m - 1) for s, m in zip(stem, n)], axis=0), rtol=1e-5)
    assert bn.momentum == 0.1  # the training passes move the statistics as before
    moved = [x.mean.copy() for x in net.norms]
    net.recalibrate(w_eff, iter(batches))  # a function of the mask and the images alone
    assert all(np.array_equal(a, x.mean) for a, x in zip(moved, net.norms))


def test_fit_recalibrates_batchnorm_before_each_measurement(tmp_path):
    runner = CliRunner()
    for name, extra in (("moving", []), ("recal", ["train.bn_recalibration=300"])):
        out = runner.invoke(app, ["fit", FC, *SMALL_RESNET, "train.epochs=1", *extra, "--runs-dir", str(tmp_path), "--name", name, "-q"])
        assert out.exit_code == 0, out.output
    moving, recal = store.load(tmp_path / "moving"), store.load(tmp_path / "recal")
    for name in ("scores", "masks"):  # training itself is the same
        assert all(np.array_equal(a, b) for a, b in zip(getattr(moving, name), getattr(recal, name)))
    assert not np.allclose(moving.norms[0], recal.norms[0])
    result = runner.invoke(app, ["eval", str(tmp_path / "recal"), "--json"])
    assert result.exit_code == 0 and '"matches_record": true' in result.output


def test_model_bn_is_checked():
    from scoretrain.run.config import load
    from scoretrain.errors import ConfigError

    with pytest.raises(ConfigError, match="model.bn: expected one of none, nonaffine, affine, got 'learned'"):
        load(None, ["model.arch=resnet20", "model.bn=learned"])
    with pytest.raises(ConfigError, match="model.bn: affine has no effect here: it applies to the conv and residual presets"):
        load(None, ["model.bn=affine"])
    assert math.isclose(load(None, ["model.arch=resnet20", "model.bn=nonaffine"]).model.width, 1.0)
    with pytest.raises(ConfigError, match="train.bn_recalibration: expected 0 for a network without BatchNorm"):
        load(None, ["model.arch=resnet20", "train.bn_recalibration=1000"])
    with pytest.raises(ConfigError, match="train.bn_recalibration: expected an integer >= 0, got -1"):
        load(None, ["model.arch=resnet20", "model.bn=nonaffine", "train.bn_recalibration=-1"])


@pytest.mark.parametrize("c_in, c_out", [(5, 3), (3, 5)])
@pytest.mark.parametrize("k, stride, pad", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (5, 2, 2), (3, 1, 0), (1, 1, 0), (3, 3, 0)])
def test_the_conv_loops_give_the_array_codes_bits(k, stride, pad, c_in, c_out, monkeypatch):
    """The numba patch copy (forward; dx at stride 1 where c_out <= c_in) and col2im (dx else)."""
    rng = np.random.default_rng(k + stride + pad)
    conv = numbered(Conv2d(np, c_in, c_out, k, stride, pad))
    x = rng.standard_normal((4, 9, 8, c_in)).astype(np.float32)
    w = rng.standard_normal(conv.shape).astype(np.float32)
    d = rng.standard_normal((4, *conv.output_shape((9, 8, c_in))[0])).astype(np.float32)
    out = []
    for loops in (True, False):
        if not loops:
            monkeypatch.setattr(layers, "fused", lambda *a: None)
        g = np.full(w.shape, np.nan, np.float32)
        y, cache = conv.forward(x.copy(), [w], True)
        out.append((y, conv.backward(d.copy(), cache, [w], [g], True), g))
    (y, dx, g), want = out
    assert y.dtype == dx.dtype == np.float32 and dx.shape == x.shape and dx.flags.c_contiguous  # what the next layer's loops take
    for a, b in zip((y, dx, g), want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size, shape", [(2, (3, 8, 8, 5)), (2, (2, 7, 9, 3)), (3, (2, 8, 7, 4)), (4, (1, 8, 8, 2))])
def test_the_maxpool_loops_give_the_array_codes_bits(size, shape, monkeypatch):
    """Forward and dx, with the cases where the order matters: equal maxima in a window (the
    gradient to the first), +0.0 against -0.0 (np.maximum keeps the second), NaN, and a last
    partial row or column that no window covers."""
    rng = np.random.default_rng(size + sum(shape))
    x = rng.integers(-2, 3, shape).astype(np.float32)  # few values: many equal maxima
    x[rng.random(shape) < 0.2] = -0.0
    x[0, 0, 0, 0] = np.nan
    d = rng.standard_normal((shape[0], shape[1] // size, shape[2] // size, shape[3])).astype(np.float32)
    pool, out = MaxPool2d(np, size), []
    for loops in (True, False):
        if not loops:
            monkeypatch.setattr(layers, "fused", lambda *a: None)
        y, cache = pool.forward(x.copy(), [], True)
        out.append((y, pool.backward(d.copy(), cache, [], [], True)))
    for got, want in zip(*out):
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
        assert got.tobytes() == want.tobytes()  # the signs of zeros and the NaNs too


@pytest.mark.parametrize("loops", [True, False], ids=["numba", "array-code"])
def test_a_relu_run_by_the_max_pool_after_it_gives_the_bits_of_the_two(loops, monkeypatch):
    """ReLU then max pool, as one pass forward and backward (Network), against the two layers one
    by one (a layer given its own forward is not fused), with BatchNorm before and a 3x3 pool
    that drops a last row and column."""
    from scoretrain.nn.layers import ReLU, relu_runner, walk

    spec = "[{conv: 6}, relu, {maxpool: 2}, {conv: 5}, batchnorm, relu, {maxpool: 3}, flatten, linear]"
    cfg = config_mod.load(None, [f"model.layers={spec}", "model.method=dense"]).model
    if not loops:
        monkeypatch.setattr(layers, "fused", lambda *a: None)

    def step(fuse):
        w, s = init_network(cfg, 0, (12, 12, 2), 10)
        net = Network(np, cfg, w, s, (12, 12, 2), 10)
        if not fuse:
            for l in walk(net.layers):
                if isinstance(l, ReLU):
                    l.forward = l.forward  # its own code, given to the object: not fused
        assert any(relu_runner(net.layers, i) is not None for i in range(len(net.layers))) == fuse
        rng = np.random.default_rng(3)
        x, y = rng.standard_normal((8, 12, 12, 2)).astype(np.float32), rng.integers(0, 10, 8)
        w_eff = net.effective_weights(True)
        logits, caches = net.forward(x, w_eff)
        net.backward(caches, w_eff, cross_entropy(np, logits, y)[2])
        return [logits, *[g.copy() for g in net.grads]]

    for a, b in zip(step(True), step(False), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("sums", ["rows", "spans"])
@pytest.mark.parametrize("fusion", ["alone", "relu", "relu, exact zeros", "sum+relu"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(16, 28, 28, 8), (3, 5, 5, 1), (7, 4, 4, 3), (32, 7, 7, 32), (5, 3, 3, 96)])
def test_the_batchnorm_loops_give_the_array_codes_bits(shape, affine, train, fusion, sums, monkeypatch):
    """Forward, dx, the running statistics and dgamma, dbeta, alone and with the ReLU after it
    (forward and backward) or a residual block's sum and ReLU (forward), with the sums in row
    order (im2col's) or over spans of 64 values (the torch engine's): the loops' float64 sums run
    in the array code's order; the elementwise passes run over spans of whole rows (channel
    counts that divide 64 and not, a last partial span). Normalized values exactly 0, where the
    ReLU passes no gradient, come from integers with an exact mean."""
    from scoretrain.nn.layers import wide_span

    rng = np.random.default_rng(sum(shape))
    c = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    if fusion == "relu, exact zeros":  # integers, each channel's mean exactly 1
        rows, half = x.reshape(-1, c), len(x.reshape(-1, c)) // 2
        rows[:half] = rng.integers(-3, 6, (half, c))
        rows[half : 2 * half], rows[2 * half :] = 2 - rows[:half], 1
    d = rng.standard_normal(shape).astype(np.float32)
    add = rng.standard_normal(shape).astype(np.float32) if fusion == "sum+relu" else None
    if sums == "spans":
        monkeypatch.setattr(BatchNorm, "sum_span", lambda self: wide_span(self.c))
    states = []
    for loops in (True, False):
        bn = BatchNorm(np, c, affine=affine)
        bn.mean[...], bn.var[...] = 0.3, 1.7  # what measuring (train False) normalizes by
        if affine:
            flat, grad = np.linspace(-1.5, 2, 2 * c, dtype=np.float32), np.full(2 * c, np.nan, np.float32)
            bn.gamma, bn.beta, bn.dgamma, bn.dbeta = flat[:c], flat[c:], grad[:c], grad[c:]
        if not loops:
            monkeypatch.setattr(layers, "fused", lambda *a: None)
        y, cache = bn.forward(x.copy(), [], train, relu=fusion != "alone", add=add)
        dx = bn.backward(d.copy(), cache, [], [], True)
        states.append([y, dx, bn.mean.copy(), bn.var.copy()] + ([grad.copy()] if affine else []))
    monkeypatch.undo()
    for got, want in zip(*states):
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()


def test_the_two_orders_of_batchnorms_sums_agree_to_float64_rounding():
    """Row order and spans of 64 values: the same float64 sums but for their last bits, each
    within 1e-12 of the exact sum (math.fsum)."""
    import math as m

    from scoretrain.nn.layers import wide_span

    rng = np.random.default_rng(4)
    x = (rng.standard_normal((64, 28, 28, 8)) * 5 + 2).astype(np.float32)
    bn = BatchNorm(np, 8)
    exact = np.array([m.fsum(x[..., ch].astype(np.float64).ravel()) for ch in range(8)])
    for span in (8, wide_span(8)):
        assert np.abs(bn.channel_sum(x, span) - exact).max() <= 1e-12 * np.abs(x).sum()
    assert not np.array_equal(bn.channel_sum(x, 8), bn.channel_sum(x, wide_span(8)))  # two orders, other last bits


@pytest.mark.parametrize("train", [True, False])
def test_affine_batchnorm_gradients_of_x_gamma_and_beta(train):
    rng = np.random.default_rng(6)
    bn = BatchNorm(np, 3, affine=True)
    flat, grad = np.array([1.5, 0.5, -1.0, 0.2, -0.3, 0.1]), np.zeros(6)
    bn.gamma, bn.beta, bn.dgamma, bn.dbeta = flat[:3], flat[3:], grad[:3], grad[3:]
    bn.mean[...], bn.var[...] = [0.1, -0.2, 0.3], [0.5, 2.0, 1.5]
    x = rng.standard_normal((4, 3, 3, 3)) * 2 + 1
    check_layer(bn, x, train=train)  # dx
    y, cache = bn.forward(x.copy(), [], train)
    G = rng.standard_normal(y.shape)
    bn.backward(G, cache, [], [], True)
    eps = 1e-6
    for i in range(6):
        up, down = flat.copy(), flat.copy()
        up[i] += eps
        down[i] -= eps
        values = []
        for probe in (up, down):
            bn.gamma, bn.beta = probe[:3], probe[3:]
            state = bn.mean.copy(), bn.var.copy()
            values.append(float((bn.forward(x.copy(), [], train)[0] * G).sum()))
            bn.mean[...], bn.var[...] = state
        assert grad[i] == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-6), i


def test_affine_batchnorm_is_learned_stored_and_resumed(tmp_path, reference):
    affine = [*SMALL_RESNET[:2], "model.bn=affine", *SMALL_RESNET[3:]]
    run_dir = stopped_run(tmp_path, affine[:1], *affine[1:], after=1)
    out = CliRunner().invoke(app, ["fit", "--resume", str(run_dir)])
    assert out.exit_code == 0, out.output
    ref = reference("sgd", *affine)
    assert_identical(run_dir, ref)
    norms = store.load(run_dir).norms
    assert all(s.shape[0] == 4 for s in norms)  # mean, var, gamma, beta
    assert not np.allclose(norms[0][2], 1) and not np.allclose(norms[0][3], 0)  # gamma and beta were learned
    for a, b in zip(norms, store.load(ref).norms):
        np.testing.assert_array_equal(a, b)
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 0 and '"matches_record": true' in result.output


def test_wrn28_widens_its_stages_and_not_its_stem():
    ws = weight_layers(build_layers(np, ModelConfig(arch="wrn28", width=10, bn="nonaffine"), (32, 32, 3), 10))
    assert ws[0].shape == (16, 3, 3, 3)  # the stem: 16 channels for every widening factor
    assert sorted({l.shape[0] for l in ws[1:-1]}) == [160, 320, 640] and ws[-1].shape == (10, 640)
    assert sum(1 for l in ws if getattr(l, "k", None) == 3) == 1 + 3 * 4 * 2  # 25 3x3 convs + 3 shortcuts + FC


def test_a_measuring_pass_holds_one_layers_patches_at_a_time():
    """Network.logits (eval, the test each epoch, BatchNorm's recalibration) drops each layer's
    backward cache as the next layer runs: the logits of the full pass, bit for bit, at a peak of
    one residual block's im2col patches and activations where the full pass holds every layer's
    (a 1-epoch fit of resnet20 x0.5, whose test runs at a batch of 1,000: 1.1 GB of process
    instead of 3.3)."""
    import tracemalloc

    cfg = ModelConfig(arch="resnet20", width=0.5, bn="nonaffine", k=0.5)
    w, s = init_network(cfg, 0, (28, 28, 1), 10)
    net = Network(np, cfg, w, s, (28, 28, 1), 10)
    x = np.random.default_rng(0).standard_normal((32, 28, 28, 1)).astype(np.float32)
    w_eff = net.effective_weights(train=False)

    def traced(run):
        """run()'s result and the peak of what NumPy allocated meanwhile."""
        tracemalloc.start()
        try:
            return run(), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    full, full_peak = traced(lambda: net.forward(x.copy(), w_eff, train=False)[0])
    logits, peak = traced(lambda: net.logits(x.copy(), w_eff))
    assert logits.tobytes() == full.tobytes()
    patches = 32 * 28 * 28 * 9 * 8 * 4  # one stage-1 conv's im2col patches, float32
    block = 2 * patches + 7 * (patches // 9)  # a residual block's: its two convs' patches, 7 activations
    assert peak <= block < full_peak / 4, (peak, block, full_peak)
