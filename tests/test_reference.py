"""scoretrain/nn/reference.py, edge-popup as plain array code, and the fast paths against it bit
for bit: methods.topk_mask (the fused CPU loops and the array code that CuPy runs),
methods.straight_through, and the method's gradient through a real network."""

import numpy as np
import pytest

from scoretrain.kernels.backend import fused
from scoretrain.nn import reference
from scoretrain.nn.methods import kept_count, straight_through, topk_mask
from scoretrain.nn.model import Network, init_network
from scoretrain.run.config import ModelConfig
from test_model import ForeignNumpy

TIES = np.array([0.0, -0.0, 0.25, -0.25, 0.5, -0.5, 1.0], np.float32)  # signed zeros tie too


def scores(kind, n, rng):
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ties":  # a handful of magnitudes: most of the mask is decided by the index rule
        return rng.choice(TIES, n)
    return np.full(n, -0.5, np.float32)  # "equal": only the index rule decides


# --- (a) the reference itself ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["normal", "ties", "equal"])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("k", [0.0, 0.01, 0.25, 0.5, 0.35, 0.999, 1.0])
def test_the_reference_keeps_exactly_kept_count_of_the_largest_magnitudes(kind, n, k):
    s = scores(kind, n, np.random.default_rng(n))
    mask = reference.topk_mask(s, k)
    kept = kept_count(k, n)
    assert mask.shape == s.shape and mask.dtype == bool and mask.sum() == kept
    a = np.abs(s)
    if 0 < kept < n:
        assert a[mask].min() >= a[~mask].max()  # by magnitude, not by sign
        t = a[mask].min()  # ties at the threshold go to the lowest indices
        at = np.flatnonzero(a == t)
        np.testing.assert_array_equal(mask[at], np.arange(at.size) < np.count_nonzero(mask[at]))


def test_the_reference_keeps_shape_and_the_first_equal_scores():
    s = np.zeros((2, 5), np.float32)
    np.testing.assert_array_equal(reference.topk_mask(s, 0.4), [[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(reference.keep_largest(np.array([-3.0, 1.0, 3.0, -2.0]), 2), [1, 0, 1, 0])
    w = np.arange(1, 11, dtype=np.float32).reshape(2, 5)
    np.testing.assert_array_equal(reference.forward(w, s, 0.4), [[1, 2, 3, 4, 0], [0, 0, 0, 0, 0]])


# --- (b) the fast paths' masks against it ------------------------------------------------------------

PATHS = [pytest.param(np, id="fused"), pytest.param(ForeignNumpy(), id="array-code")]


@pytest.mark.parametrize("xp", PATHS)
@pytest.mark.parametrize("kind", ["normal", "ties", "equal"])
@pytest.mark.parametrize("shape", [(1,), (31,), (33,), (1000,), (64, 3, 3, 5), (7919,)])
def test_topk_mask_gives_the_references_mask_bit_for_bit(xp, kind, shape):
    rng = np.random.default_rng(sum(shape))
    s = scores(kind, int(np.prod(shape)), rng).reshape(shape)
    w = rng.standard_normal(shape).astype(np.float32)
    if xp is np:
        assert fused(np, s, w) is not None  # the numba loops run, not the array code
    for k in (0.01, 0.1, 0.3, 0.5, 0.9, 1.0):
        want = reference.topk_mask(s, k)
        exact = np.sort(np.abs(s).ravel())[::-1][kept_count(k, s.size) - 1]
        for hint in (None, exact, np.float32(exact * 1.003), np.float32(exact * 0.5)):  # hints change only the speed
            w_out = np.full_like(w, np.nan)
            mask, _ = topk_mask(xp, s, kept_count(k, s.size), hint, keep=(w, w_out))
            np.testing.assert_array_equal(mask, want, err_msg=f"k={k} hint={hint}")
            np.testing.assert_array_equal(w_out.view(np.uint32), reference.forward(w, s, k).view(np.uint32))


@pytest.mark.parametrize("xp", PATHS)
def test_straight_through_gives_the_references_bits(xp):
    rng = np.random.default_rng(0)
    g, w, s = (rng.standard_normal(1001).astype(np.float32) for _ in range(3))
    s[:4] = [0.0, -0.0, np.inf, -np.inf]
    want = reference.backward(g, w, s)
    if xp is np:
        assert fused(np, g, w, s) is not None
    straight_through(xp, g, w, s, np.empty_like(s))
    np.testing.assert_array_equal(g.view(np.uint32), want.view(np.uint32))


# --- (c) the method's gradient through a network ----------------------------------------------------


@pytest.mark.parametrize("method", ["edge-popup", "iterand"])
@pytest.mark.parametrize("arch", ["mlp", "conv2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fused", "array-code"])
def test_the_methods_forward_and_score_gradient_are_the_references(method, arch, dtype):
    """W_eff from the network's top-k, and dL/dS from backward's dL/dW_eff, each layer, bit for bit
    (float32 takes the fused CPU loops, float64 the array code)."""
    from scoretrain.nn.model import cross_entropy

    rng = np.random.default_rng(1)
    if arch == "mlp":
        cfg, image = ModelConfig(method=method, widths=[12, 32, 32, 3], k=0.3), (1, 12, 1)
    else:
        cfg, image = ModelConfig(method=method, arch=arch, width=0.1, k=0.3), (8, 8, 2)
    w, s = init_network(cfg, 0, image, 3)
    net = Network(np, cfg, [a.astype(dtype) for a in w], [a.astype(dtype) for a in s], image, 3)
    w_eff = net.effective_weights(True)
    for we, weight, sc in zip(w_eff, net.weights, net.scores):
        np.testing.assert_array_equal(we, reference.forward(weight, sc, 0.3))
    x, y = rng.standard_normal((5, *image)).astype(dtype), rng.integers(0, 3, 5)
    logits, caches = net.forward(x, w_eff)
    net.backward(caches, w_eff, cross_entropy(np, logits, y)[2])
    g_w_eff = [g.copy() for g in net.grads]  # dL/dW_eff; learned_gradient turns it into dL/dS in place
    net.learned_gradient()
    for layer, (g, weight, sc) in enumerate(zip(g_w_eff, net.weights, net.scores)):
        want = reference.backward(g, weight, sc)
        np.testing.assert_array_equal(net.score_grads[layer], want, err_msg=f"layer {layer}")
        assert np.abs(want[~net.masks[layer]]).sum() > 0  # pruned weights' scores get gradient too


# --- (d) backward is the straight-through product, not a derivative of the mask ------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_is_grad_times_weight_with_the_mask_ignored(dtype):
    """No finite differences: the top-k is a step function, and the straight-through gradient is
    by definition dL/dW_eff * W, at kept and pruned weights alike (times sign(S) for S itself)."""
    rng = np.random.default_rng(2)
    g, w, s = (rng.standard_normal((40, 25)).astype(dtype) for _ in range(3))
    s[0, :4] = [0.0, -0.0, 0.0, -0.0]
    d = reference.backward(g, w)
    np.testing.assert_array_equal(d, g * w)
    for k in (0.1, 0.5, 1.0):  # the same whatever the mask keeps
        pruned = ~reference.topk_mask(s, k)
        np.testing.assert_array_equal(d[pruned], (g * w)[pruned])
    ds = reference.backward(g, w, s)
    np.testing.assert_array_equal(ds[s != 0], (g * w * np.sign(s))[s != 0])
    np.testing.assert_array_equal(ds[0, :4], (g * w)[0, :4] * [1, -1, 1, -1])  # the sign bit of ±0
