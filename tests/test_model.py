"""The algorithm's numerics: exact top-k masks, layers and methods against finite differences."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scoretrain.run.config import ModelConfig
from scoretrain.nn import reference
from scoretrain.nn.methods import kept_count, topk_mask
from scoretrain.nn.model import Network, build_layers, cross_entropy, init_network


class ForeignNumpy:
    """NumPy under another name. As `xp` it is not `np`, so the branches written for CuPy (the
    partition + cumsum top-k in topk_mask) run here on the CPU, where CI has no GPU to run them."""

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (1000, 500), (1000, 1), (1000, 999), (1000, 1000), (7919, 2000)])
def test_topk_matches_sort_on_random_scores(n, k):
    a = np.abs(np.random.default_rng(n + k).standard_normal(n)).astype(np.float32)
    mask, _ = topk_mask(np, a, k)
    assert mask.sum() == k
    np.testing.assert_array_equal(mask, reference.keep_largest(a, k))


@pytest.mark.parametrize("k", [1, 5, 50, 333, 600, 999])
def test_topk_is_exact_and_deterministic_on_tie_heavy_scores(k):
    a = np.random.default_rng(k).integers(0, 4, size=(30, 40)).astype(np.float32)  # 4 distinct values
    mask, _ = topk_mask(np, a, k)
    assert mask.shape == a.shape and mask.sum() == k
    np.testing.assert_array_equal(mask, reference.keep_largest(a, k))


def test_all_equal_scores_keep_the_first_k():
    out = np.ones(10, dtype=bool)
    mask, _ = topk_mask(np, np.zeros(10, np.float32), 4, out=out)
    np.testing.assert_array_equal(out, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])  # written into `out`
    np.testing.assert_array_equal(mask, out)


@pytest.mark.parametrize("hint_scale", [None, 0.0, 0.5, 0.99, 1.0, 1.005, 1.05, 2.0, 100.0])
def test_threshold_hint_changes_speed_never_the_mask(hint_scale):
    rng = np.random.default_rng(1)
    for a in (np.abs(rng.standard_normal(20011)).astype(np.float32),
              rng.integers(0, 50, 20011).astype(np.float32)):  # tie-heavy; not a multiple of 32
        for k in (1, 137, 10000, 19999):
            exact = np.sort(a)[::-1][k - 1]
            hint = None if hint_scale is None else np.float32(exact * hint_scale)
            mask, t = topk_mask(np, a, k, hint)
            assert t == exact and mask.sum() == k
            np.testing.assert_array_equal(mask, reference.keep_largest(a, k))


def test_hint_from_the_last_step_stays_exact_as_scores_move():
    """The training pattern: each step's threshold is the next step's hint."""
    rng = np.random.default_rng(2)
    s = rng.uniform(-0.05, 0.05, 50000).astype(np.float32)
    hint = None
    for _ in range(30):
        s += rng.normal(0, 1e-4, s.size).astype(np.float32)
        a = np.abs(s)
        mask, hint = topk_mask(np, a, 25000, hint)
        np.testing.assert_array_equal(mask, reference.keep_largest(a, 25000))


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 7919])
def test_score_step_and_settle_are_the_top_k_or_say_they_missed(n):
    """The CPU top-k pass (blocks of 32, a partial last block, spans that start anywhere) for
    bands that hold the k-th largest |x| or not, tie-heavy values included, then settle."""
    from scoretrain.kernels import loops as kernels

    rng = np.random.default_rng(n)
    for x in (rng.standard_normal(n).astype(np.float32), rng.integers(-3, 4, n).astype(np.float32)):
        b = np.sort(x.view(np.uint32) & kernels.MAGNITUDE)[::-1]  # descending
        w = rng.standard_normal(n).astype(np.float32)
        for k in sorted({1, max(1, n // 3), n}):
            t = b[k - 1]
            f = t.view(np.float32)  # the k-th largest |x|
            up, down = np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(0))
            for lo, hi in [(0, np.inf), (f, f), (f / 2, f), (f, 2 * f + 1), (up, up * 2 + 1), (0, down)]:
                # x as the second of two spans, at offset 37: indices come back relative to the span
                xs, ws = np.concatenate([np.ones(37, np.float32), x]), np.concatenate([np.ones(37, np.float32), w])
                mask, out = np.zeros(n + 37, bool), np.full(n + 37, np.nan, np.float32)
                band = kernels.Band(np.array([[0, 37], [37, n + 37]]), np.array([(0, 2), (lo, hi)], np.float32),
                                    mask, np.empty(n + 37, np.int64), np.empty((2, 2), np.int64))
                kernels.score_step(xs, None, None, None, ws, band, out)
                (above, found), index = band.counts[1], band.index[37 : 37 + band.counts[1, 1]]
                assert above == np.sum(np.abs(x) > np.float32(hi)) and found == np.sum((np.abs(x) >= lo) & (np.abs(x) <= hi))
                assert (above < k <= above + found) == (lo <= f <= hi)
                if lo <= f <= hi:
                    assert kernels.settle(x, k, above, index, mask[37:], w, out[37:]) == t
                    np.testing.assert_array_equal(mask[37:], reference.keep_largest(x, k))
                    np.testing.assert_array_equal(out[37:], w * mask[37:])
                assert tuple(band.counts[0]) == (0, 37)  # the first span, all ones, lies in its band (0, 2)


def test_fused_loops_give_the_bits_of_the_numpy_expressions():
    from scoretrain.kernels import loops as kernels

    rng = np.random.default_rng(0)
    g, w, s = (rng.standard_normal(1001).astype(np.float32) for _ in range(3))
    s[:4] = [0.0, -0.0, np.inf, -np.inf]
    expected = reference.backward(g, w, s)
    kernels.straight_through(g, w, s)
    np.testing.assert_array_equal(g.view(np.uint32), expected.view(np.uint32))  # -0.0 included
    mask = rng.random(1001) < 0.5
    out = np.empty_like(w)
    kernels.masked(w, mask, out)
    np.testing.assert_array_equal(out.view(np.uint32), (w * mask).view(np.uint32))
    t = np.float32(0.7).view(np.uint32)
    kernels.keep_top(s, t, 0, mask, w, out)
    np.testing.assert_array_equal(mask, np.abs(s) > np.float32(0.7))
    np.testing.assert_array_equal(out.view(np.uint32), (w * mask).view(np.uint32))
    s[10:20] = -0.7
    kernels.keep_top(s, t, 3, mask, None, None)  # the mask only; the first 3 ties kept
    expected = np.abs(s) > np.float32(0.7)
    expected[10:13] = True
    np.testing.assert_array_equal(mask, expected)


def test_topk_ranks_by_magnitude_on_both_code_paths():
    """Scores are signed: the mask keeps the largest |s|, on the fused CPU path and the array code."""
    rng = np.random.default_rng(5)
    s = rng.standard_normal(5000).astype(np.float32)
    for hint in (None, np.float32(np.sort(np.abs(s))[-1500] * 1.001)):
        mask, t = topk_mask(np, s, 1500, hint)
        np.testing.assert_array_equal(mask, reference.keep_largest(s, 1500))
        assert t == np.sort(np.abs(s))[-1500]
    mask, _ = topk_mask(ForeignNumpy(), s, 1500)
    np.testing.assert_array_equal(mask, reference.keep_largest(s, 1500))


@pytest.mark.parametrize("xp", [np, ForeignNumpy()], ids=["fused", "array-code"])
def test_topk_keep_writes_the_masked_weights_ties_included(xp):
    rng = np.random.default_rng(6)
    for s in (rng.standard_normal(3001).astype(np.float32), rng.integers(-3, 4, 3001).astype(np.float32)):
        w = rng.standard_normal(3001).astype(np.float32)
        for hint in (None, np.float32(1.0)):
            w_out = np.full_like(w, np.nan)
            mask, _ = topk_mask(xp, s, 1000, hint, keep=(w, w_out))
            np.testing.assert_array_equal(mask, reference.keep_largest(s, 1000))
            np.testing.assert_array_equal(w_out, w * mask)


@pytest.mark.parametrize("k,n,expected", [(0.5, 10, 5), (0.3, 10, 3), (0.25, 10, 2), (0.35, 10, 4), (0.01, 10, 1), (1.0, 7, 7)])
def test_kept_count_is_round_k_n(k, n, expected):
    assert kept_count(k, n) == expected


def mlp(method="edge-popup", k=0.3, widths=(784, 250, 250, 10), **kw):
    cfg = ModelConfig(method=method, widths=list(widths), k=k, **kw)
    w, s = init_network(cfg, seed=3)
    return Network(np, cfg, w, s), w


def test_layer_masks_have_exact_sizes():
    net, w = mlp(k=0.3)
    w_eff = net.effective_weights()
    for m, we, weight, s in zip(net.masks, w_eff, w, net.scores):
        assert m.sum() == round(0.3 * weight.size)
        np.testing.assert_array_equal(m, reference.topk_mask(s, 0.3))
        np.testing.assert_array_equal(we != 0, m)  # signed-constant weights are never 0 themselves


def test_global_scope_keeps_k_of_the_whole_network():
    net, w = mlp(k=0.3, k_scope="global")
    net.effective_weights()
    total = sum(x.size for x in w)
    assert sum(int(m.sum()) for m in net.masks) == round(0.3 * total)
    flat_abs = np.concatenate([np.abs(s).ravel() for s in net.scores])
    np.testing.assert_array_equal(np.concatenate([m.ravel() for m in net.masks]), reference.topk_mask(flat_abs, 0.3))
    per_layer = [m.mean() for m in net.masks]
    assert max(per_layer) - min(per_layer) > 0.01  # layers keep different fractions


def test_signed_constant_init_and_seed_reproducibility():
    cfg = ModelConfig(widths=[20, 30, 10], init="signed_constant")
    w1, s1 = init_network(cfg, 7, (20, 1, 1))
    w2, s2 = init_network(cfg, 7, (20, 1, 1))
    w3, _ = init_network(cfg, 8, (20, 1, 1))
    for a, b in zip(w1 + s1, w2 + s2):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(w1[0], w3[0])
    np.testing.assert_allclose(np.unique(np.abs(w1[0])), [np.sqrt(2.0 / 20)], rtol=1e-6)
    scaled, _ = init_network(ModelConfig(widths=[20, 30, 10], k=0.5, scale_fan=True), 7, (20, 1, 1))
    np.testing.assert_allclose(np.abs(scaled[0]), np.sqrt(2.0 / (0.5 * 20)), rtol=1e-6)


def test_every_method_starts_from_the_same_random_weights():
    base, _ = init_network(ModelConfig(method="edge-popup", widths=[20, 30, 10]), 1, (20, 1, 1))
    for method in ("dense", "biprop", "supermask"):
        w, s = init_network(ModelConfig(method=method, widths=[20, 30, 10]), 1, (20, 1, 1))
        assert (s is None) == (method == "dense")
        for a, b in zip(base, w):
            np.testing.assert_array_equal(a, b)


def test_conv_architectures_have_the_papers_shapes():
    shapes = lambda arch, image, width=1.0: [l.shape for l in build_layers(np, ModelConfig(arch=arch, width=width), image, 10) if hasattr(l, "shape")]  # noqa: E731
    assert shapes("conv2", (32, 32, 3)) == [(64, 3, 3, 3), (64, 3, 3, 64), (256, 16 * 16 * 64), (256, 256), (10, 256)]
    assert shapes("conv6", (32, 32, 3))[-3] == (256, 4 * 4 * 256)
    assert shapes("conv8", (28, 28, 1))[-3] == (256, 1 * 1 * 512)
    assert shapes("conv4", (32, 32, 3), width=0.5)[:2] == [(32, 3, 3, 3), (32, 3, 3, 32)]
    assert shapes("lenet", (28, 28, 1)) == [(32, 5, 5, 1), (64, 5, 5, 32), (512, 7 * 7 * 64), (10, 512)]


# --- gradients against finite differences ------------------------------------------------------


def problem(method, arch="mlp", seed=0, granularity="weight"):
    """A tiny float64 network and batch: an MLP, or a conv net on 8x8 two-channel images."""
    rng = np.random.default_rng(seed)
    if arch == "mlp":
        cfg, image = ModelConfig(method=method, widths=[12, 32, 32, 3], k=0.5, init="kaiming_normal", score_granularity=granularity), (1, 12, 1)
    else:
        # Wide enough that every unit keeps some weights, so no pre-activation sits exactly
        # on the ReLU kink at 0, where a finite difference sees only half the slope
        cfg, image = ModelConfig(method=method, arch=arch, width=0.1, k=0.5, init="kaiming_normal", score_granularity=granularity), (8, 8, 2)
    w, s = init_network(cfg, seed, image, 3)
    net = Network(np, cfg, [a.astype(np.float64) for a in w], None if s is None else [a.astype(np.float64) for a in s], image, 3)
    x = rng.standard_normal((5, *image))
    return net, x, rng.integers(0, 3, 5)


def loss_of(net, w_eff, x, y):
    logits, _ = net.forward(x.copy(), w_eff)
    return float(cross_entropy(np, logits, y)[0]) / len(y)


def numeric_grad(net, w_eff, x, y, layer, eps=1e-6):
    num = np.zeros_like(w_eff[layer])
    probe = [a.copy() for a in w_eff]
    for idx in np.ndindex(num.shape):
        old = probe[layer][idx]
        probe[layer][idx] = old + eps
        up = loss_of(net, probe, x, y)
        probe[layer][idx] = old - eps
        num[idx] = (up - loss_of(net, probe, x, y)) / (2 * eps)
        probe[layer][idx] = old
    return num


def analytic(net, x, y, train=True):
    w_eff = [a.copy() for a in net.effective_weights(train)]
    logits, caches = net.forward(x.copy(), w_eff)
    net.backward(caches, w_eff, cross_entropy(np, logits, y)[2])
    net.learned_gradient()
    return w_eff, [g.copy() for g in net.grads]


def test_cross_entropy_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    logits, y = rng.standard_normal((4, 5)), rng.integers(0, 5, 4)
    _, _, grad = cross_entropy(np, logits.copy(), y)
    eps, num = 1e-6, np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[idx] += eps
        down[idx] -= eps
        num[idx] = (float(cross_entropy(np, up, y)[0]) - float(cross_entropy(np, down, y)[0])) / (2 * eps * len(y))
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("arch", ["mlp", "conv2", "lenet"])
def test_dense_weight_gradients_match_finite_differences(arch):
    """Linear, Conv2d (im2col), ReLU, MaxPool2d and Flatten backward, end to end."""
    net, x, y = problem("dense", arch)
    w_eff, grads = analytic(net, x, y)
    for layer in range(len(w_eff)):
        np.testing.assert_allclose(grads[layer], numeric_grad(net, w_eff, x, y, layer), rtol=1e-5, atol=1e-7, err_msg=f"layer {layer}")


@pytest.mark.parametrize("method", ["edge-popup", "biprop", "supermask", "iterand"])
@pytest.mark.parametrize("arch", ["mlp", "conv2"])
def test_score_gradient_is_straight_through_the_mask(method, arch):
    """dL/dS = dL/dW_eff * dW_eff/dS with the mask's derivative taken as the identity; dL/dW_eff
    itself is checked by finite differences on the masked network."""
    net, x, y = problem(method, arch)
    w_eff, grads = analytic(net, x, y)
    for layer in range(len(w_eff)):
        w, s = net.weights[layer], net.scores[layer]
        num = numeric_grad(net, w_eff, x, y, layer)
        if method in ("edge-popup", "iterand"):
            through = w * np.sign(s)
        elif method == "biprop":
            through = net.method.alphas[layer] * np.sign(w) * np.sign(s)
        else:
            p = 1 / (1 + np.exp(-s))
            through = w * p * (1 - p)
        np.testing.assert_allclose(grads[layer], num * through, rtol=1e-5, atol=1e-8, err_msg=f"layer {layer}")
        assert np.abs(grads[layer][~net.masks[layer]]).sum() > 0  # pruned weights' scores get gradient too


def test_biprop_uses_scaled_signs_of_the_kept_weights():
    net, _, _ = problem("biprop")
    w_eff = net.effective_weights()
    for w, m, we in zip(net.weights, net.masks, w_eff):
        alpha = np.abs(w[m]).mean()
        np.testing.assert_allclose(we, alpha * np.sign(w) * m)


def test_supermask_samples_while_training_and_a_fixed_sample_when_measuring():
    net, _, _ = problem("supermask")
    net.scores[0][:] = 0.0
    net.scores[0][0, :4] = 30.0  # p = 1: always kept
    net.scores[0][1, :4] = -30.0  # p = 0: never kept
    net.reseed(0, 0)
    a = [m.copy() for m in (net.effective_weights(True) and net.masks)]
    b = [m.copy() for m in (net.effective_weights(True) and net.masks)]
    assert any(not np.array_equal(x, z) for x, z in zip(a, b))  # a fresh sample per step
    assert a[0][0, :4].all() and not a[0][1, :4].any()
    assert 0.4 < a[0][2:].mean() < 0.6  # p = 0.5
    m1 = [m.copy() for m in (net.effective_weights(False) and net.masks)]
    m2 = [m.copy() for m in (net.effective_weights(False) and net.masks)]
    for x, z in zip(m1, m2):
        np.testing.assert_array_equal(x, z)  # measuring: one sample, the same every time in an epoch
    net.reseed(0, 0)
    c = [m.copy() for m in (net.effective_weights(True) and net.masks)]
    for x, z in zip(a, c):
        np.testing.assert_array_equal(x, z)  # the same (seed, epoch): the same samples


def test_scores_decide_the_mask_not_the_weights():
    net, _, _ = problem("edge-popup")
    before = [m.copy() for m in (net.effective_weights() and net.masks)]
    net.scores[0][:] = 0.0
    net.scores[0][0, :3] = 5.0  # these must now be among the kept
    net.effective_weights()
    assert net.masks[0][0, :3].all()
    assert not np.array_equal(before[0], net.masks[0])


def test_bench_measures_a_small_case():
    """The benchmark's own code path runs and reports sane figures (a smoke test, not a timing)."""
    from scoretrain.commands import bench
    from scoretrain.kernels.backend import resolve

    x = np.random.default_rng(0).standard_normal((512, 28, 28, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 512)
    pair = bench.measure_pair(resolve("cpu"), x, y, ["edge-popup", "dense"], [784, 32, 10], 64, 6, 3, rounds=2)
    assert [r["method"] for r in pair] == ["edge-popup", "dense"]
    for r in pair:
        assert len(r["seconds_per_step_rounds"]) == 2 and r["seconds_per_step"] == min(r["seconds_per_step_rounds"]) > 0
        assert r["samples_per_second"] == 64 / r["seconds_per_step"]
        assert abs(sum(r["split"].values()) - 1) < 1e-9 and set(r["split"]) == {"select", "forward", "backward", "update"}
    assert pair[1]["split"]["select"] < pair[0]["split"]["select"]  # dense has no mask to select


def test_bench_of_a_shipped_conv_net_splits_the_step_by_layer_kind(tmp_path):
    """`bench --net resnet20`: the step of configs/mnist_resnet20.yaml (its batch size and learning
    rate), the time of each layer kind's passes, the blocks' own (the residual add) apart from
    their layers'. An unknown --net is one line, exit 2."""
    from typer.testing import CliRunner

    from scoretrain.commands import bench
    from scoretrain.kernels.backend import resolve
    from scoretrain.cli import app

    x = np.random.default_rng(0).standard_normal((300, 28, 28, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 300)
    r = bench.measure_net(resolve("cpu"), x, y, "resnet20", steps=1, rounds=2, split_steps=1)
    assert (r["arch"], r["width"], r["batch_size"], r["lr"]) == ("resnet20", 0.5, 128, 0.1)  # the shipped recipe
    assert r["seconds_per_step"] == min(r["seconds_per_step_rounds"]) > 0
    split = r["split"]
    kinds = {"conv", "batchnorm", "residual add", "pool", "linear"}  # every ReLU runs in the BatchNorm before it: its time
    assert set(split) == {f"{k} {p}" for k in kinds for p in ("forward", "backward")} | {
        "mask selection", "loss", "update", "other forward", "other backward"}
    assert all(v >= 0 for k, v in split.items() if not k.startswith("other"))
    assert split["conv forward"] > split["residual add forward"]  # a block's own time is its add, not its convs'
    assert r["convs_timed"] == 21 and r["convs_alone"] > 0  # the stem, 18 in the blocks, 2 projections
    result = CliRunner().invoke(app, ["bench", "--net", "resnet9", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "--net: expected one of mlp, lenet, resnet20" in result.output


# --- the CuPy code path, run on NumPy -----------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1, 1), (1000, 1), (1000, 500), (1000, 999), (1000, 1000), (7919, 2000)])
def test_device_topk_branch_is_exact_and_writes_into_a_view(n, k):
    rng = np.random.default_rng(n + k)
    for a in (np.abs(rng.standard_normal(n)).astype(np.float32), rng.integers(0, 4, n).astype(np.float32)):
        buf = np.zeros(n + 10, dtype=bool)  # the mask lands in a view, as in Network's flat m_flat[lo:hi]
        mask, _ = topk_mask(ForeignNumpy(), a, k, out=buf[5 : 5 + n])
        np.testing.assert_array_equal(mask, reference.keep_largest(a, k))
        np.testing.assert_array_equal(buf[5 : 5 + n], mask)
        assert not buf[:5].any() and not buf[5 + n :].any()


@pytest.mark.parametrize("method", ["edge-popup", "biprop", "supermask", "dense"])
@pytest.mark.parametrize("arch,k_scope,image", [("mlp", "layer", (28, 28, 1)), ("mlp", "global", (28, 28, 1)),
                                                ("conv2", "layer", (32, 32, 3)), ("lenet", "global", (28, 28, 1))])
def test_device_code_path_trains_bit_identically_to_the_numpy_path(method, arch, k_scope, image):
    """Every `xp is not np` branch, run on NumPy, gives the NumPy path's losses, masks and learned
    tensors bit for bit: the GPU code differs from the CPU code only in where it runs."""
    from scoretrain.nn import optim
    from scoretrain.run.config import TrainConfig
    from scoretrain.run.step import train_step

    cfg = ModelConfig(method=method, arch=arch, widths=[784, 64, 32, 10], width=0.125, k=0.4, k_scope=k_scope)
    w, s = init_network(cfg, 0, image)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3 * 16, *image)).astype(np.float32), rng.integers(0, 10, 3 * 16)
    runs = []
    for xp in (np, ForeignNumpy()):
        net = Network(xp, cfg, w, s, image)
        opt = optim.make(xp, net.params, TrainConfig())
        net.reseed(0, 0)
        losses = [float(train_step(net, opt, x[i : i + 16], y[i : i + 16], 0.1)[0]) for i in range(0, len(y), 16)]
        net.effective_weights(train=False)
        runs.append((losses, [p.copy() for p in net.params], None if net.masks is None else [m.copy() for m in net.masks]))
    (l_np, p_np, m_np), (l_dev, p_dev, m_dev) = runs
    assert l_np == l_dev
    for a, b in zip(p_np + (m_np or []), p_dev + (m_dev or [])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_times_sign_is_multiplying_by_the_sign(dtype):
    from scoretrain.nn.methods import times_sign

    rng = np.random.default_rng(0)
    g, s = rng.standard_normal(1000).astype(dtype), rng.standard_normal(1000).astype(dtype)
    expected = g * np.sign(s)
    times_sign(np, g, s, np.empty_like(g))
    np.testing.assert_array_equal(g, expected)


@pytest.mark.parametrize("opt", [dict(optimizer="sgd"), dict(optimizer="sgd", nesterov=True), dict(optimizer="sgd", momentum=0.0),
                                 dict(optimizer="sgd", weight_decay=0.0), dict(optimizer="adam"), dict(optimizer="adam", weight_decay=0.0)])
def test_fused_optimizer_updates_give_the_bits_of_the_array_code(opt):
    """optim.py's fused CPU loops against its array code (run as the CuPy path, on NumPy)."""
    from scoretrain.nn import optim
    from scoretrain.run.config import TrainConfig

    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(1000).astype(np.float32), rng.standard_normal((7, 9)).astype(np.float32)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in p0] for _ in range(4)]
    finals = []
    for xp in (np, ForeignNumpy()):
        params = [p.copy() for p in p0]
        o = optim.make(xp, params, TrainConfig(**opt))
        for step, gs in enumerate(grads):
            o.step(params, [g.copy() for g in gs], 0.1 / (step + 1))
        finals.append(params + [a for arrays in o.state.values() for a in arrays])
    for a, b in zip(*finals):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    assert not np.array_equal(finals[0][0], p0[0])


@pytest.mark.parametrize("opt", [dict(optimizer="sgd"), dict(optimizer="sgd", nesterov=True), dict(optimizer="sgd", momentum=0.0),
                                 dict(optimizer="sgd", weight_decay=0.0), dict(optimizer="adam", lr=0.003)])
@pytest.mark.parametrize("k_scope", ["layer", "global"])
def test_fused_edge_popup_step_gives_the_bits_of_the_separate_passes(opt, k_scope):
    """Network.update's one loop (methods.FusedScoreStep: straight-through, optimizer, the next
    top-k's pass) against the same step as separate numba loops (no fast path) and as array
    code (the CuPy path)."""
    from scoretrain.nn import optim
    from scoretrain.run.config import TrainConfig
    from scoretrain.run.step import train_step

    cfg = ModelConfig(widths=[784, 64, 32, 10], k=0.4, k_scope=k_scope)
    w, s = init_network(cfg, 0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12 * 16, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 12 * 16)
    t = TrainConfig(**opt)
    runs, settled = [], 0
    for xp, fast in ((np, True), (np, False), (ForeignNumpy(), False)):
        net = Network(xp, cfg, w, s)
        if not fast:
            net.method.fast = None
        assert (net.method.fast is not None) == fast
        o = optim.make(xp, net.params, t)
        for i in range(0, len(y), 16):
            if fast and i:  # the last update swept the scores: the next selection settles its bands
                counts, kept = net.method.fast.band.counts, np.array(net.method.kept)
                settled += np.sum((counts[:, 0] < kept) & (kept <= counts.sum(axis=1)))
            train_step(net, o, x[i : i + 16], y[i : i + 16], t.lr)
        net.effective_weights(train=False)
        runs.append([net.s_flat, net.m_flat, net.we_flat] + [a for arrays in o.state.values() for a in arrays])
    for fused_run_array, *others in zip(*runs):
        for other in others:
            np.testing.assert_array_equal(fused_run_array.view(np.uint8), other.view(np.uint8))
    assert settled >= 11 * len(net.method.groups) // 2  # most selections took the swept path
    assert not np.array_equal(runs[0][0], np.concatenate([a.ravel() for a in s]))  # the scores did move


def test_the_relu_loop_gives_the_array_codes_bits():
    from scoretrain.nn.layers import ReLU

    rng = np.random.default_rng(3)
    y = np.maximum(rng.standard_normal((64, 50)).astype(np.float32), 0)
    d = rng.standard_normal((64, 50)).astype(np.float32)
    d[0, :4], y[0, :4] = [np.nan, -1.0, np.inf, -0.0], [0.0, 0.0, 1.0, 2.0]
    relu = ReLU(np)
    np.testing.assert_array_equal(relu.backward(d, y, [], [], True).view(np.uint32), (d * (y > 0)).view(np.uint32))
    np.testing.assert_array_equal(relu.backward(d.astype(np.float64), y, [], [], True), d * (y > 0))  # the array code


WARM_UP_PROBE = r"""
import sys
import numpy as np
from scoretrain.kernels import loops as kernels
from scoretrain.kernels.backend import Backend
from scoretrain.nn import optim
from scoretrain.run import config, resources, step, train

cfg = config.load(sys.argv[1], sys.argv[2:])
backend = Backend(np, "cpu")
loops = [f for f in vars(kernels).values() if hasattr(f, "signatures")]
info = resources.data_info(cfg)
step.warm_up(cfg, backend, info)
warmed = {f.__name__: len(f.signatures) for f in loops}
weights, scores = resources.initial_tensors(cfg, info)
net = resources.network(cfg, info, backend, weights, scores)
opt = optim.make(np, net.params, cfg.train)
rng = np.random.default_rng(1)
x, y = rng.standard_normal((256, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 256)
train.enter_epoch(net, cfg, 0)
for i in range(0, 256, 32):
    step.train_step(net, opt, x[i : i + 32], y[i : i + 32], 0.1)
step.evaluate(net, net.effective_weights(train=False), x, y, 100)
added = {f.__name__: len(f.signatures) - warmed[f.__name__] for f in loops if len(f.signatures) > warmed[f.__name__]}
print(sum(warmed.values()), added)
"""


@pytest.mark.parametrize("overrides", [[], ["train.optimizer=adam"], ["model.method=dense"], ["model.method=biprop"],
                                       ["model.k_scope=global"], ["model.method=supermask"], ["model.arch=conv2"],
                                       ["model.arch=resnet20", "model.width=0.25", "model.bn=nonaffine"]],
                         ids=["sgd", "adam", "dense", "biprop", "global", "supermask", "conv", "resnet"])
def test_the_warm_up_compiles_every_loop_a_run_calls(overrides):
    """step.warm_up, in a fresh process: training and measuring the real network afterwards
    compiles no further numba signature, so epoch 1's clock holds no compilation."""
    config_path = str(Path(__file__).resolve().parent.parent / "configs/mnist_fc.yaml")
    proc = subprocess.run([sys.executable, "-c", WARM_UP_PROBE, config_path, *overrides], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    compiled, added = proc.stdout.split(" ", 1)
    assert int(compiled) > 0 and added.strip() == "{}", proc.stdout
