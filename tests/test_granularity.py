"""Scores per kernel or per filter (`model.score_granularity`): the top-k keeps whole units, each
score covers the weights it broadcasts over, and dL/dS is the straight-through gradient summed
over them."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FC, assert_identical, stopped_run
from scoretrain.nn import optim, reference
from scoretrain.cli import app
from scoretrain.run.config import ModelConfig, TrainConfig
from scoretrain.nn.methods import kept_count
from scoretrain.nn.model import Network, init_network, score_shape
from scoretrain.run.step import train_step
from test_model import ForeignNumpy, analytic, numeric_grad, problem

runner = CliRunner()


def test_score_shapes():
    conv, linear = (8, 3, 3, 4), (10, 64)
    assert [score_shape(conv, g) for g in ("weight", "kernel", "filter")] == [conv, (8, 1, 1, 4), (8, 1, 1, 1)]
    assert [score_shape(linear, g) for g in ("weight", "kernel", "filter")] == [linear, linear, (10, 1)]


@pytest.mark.parametrize("granularity", ["kernel", "filter"])
@pytest.mark.parametrize("k_scope", ["layer", "global"])
def test_the_top_k_keeps_exactly_k_of_the_units_and_all_of_their_weights(granularity, k_scope):
    cfg = ModelConfig(arch="conv2", width=0.125, k=0.3, k_scope=k_scope, score_granularity=granularity)
    w, s = init_network(cfg, 0, (32, 32, 3))
    net = Network(np, cfg, w, s, (32, 32, 3))
    net.effective_weights(train=False)
    units = [m.all(axis=tuple(i for i, n in enumerate(sc.shape) if n == 1 and m.shape[i] != 1), keepdims=True)
             for m, sc in zip(net.masks, net.scores)]
    for m, u, sc in zip(net.masks, units, net.scores):
        np.testing.assert_array_equal(m, np.broadcast_to(u, m.shape))  # a unit is kept or pruned whole
        if k_scope == "layer":
            assert u.sum() == kept_count(0.3, sc.size)
            np.testing.assert_array_equal(u, reference.topk_mask(sc, 0.3))  # the units' top-k, ties included
    if k_scope == "global":
        assert sum(u.sum() for u in units) == kept_count(0.3, sum(sc.size for sc in net.scores))
        np.testing.assert_array_equal(np.concatenate([u.ravel() for u in units]),
                                      reference.topk_mask(np.concatenate([sc.ravel() for sc in net.scores]), 0.3))
    for u, sc in zip(units, net.scores):  # by |score|: every kept unit outranks every pruned one of its layer
        if u.any() and (~u).any():
            assert np.abs(sc[u]).min() >= np.abs(sc[~u]).max()  # one threshold per group, global too


@pytest.mark.parametrize("granularity", ["kernel", "filter"])
@pytest.mark.parametrize("method", ["edge-popup", "biprop"])
@pytest.mark.parametrize("arch", ["mlp", "conv2"])
def test_a_units_gradient_is_the_straight_through_gradient_summed_over_its_weights(granularity, method, arch):
    """dL/dS of a unit = sum over its weights of dL/dW_eff * dW_eff/d|S| * sign(S), from
    backward's dL/dW_eff. That one is checked against finite differences on the MLP's output
    units that keep a weight: a wholly pruned unit outputs exactly 0, on ReLU's kink, where
    backward (as PyTorch) gives 0 and a finite difference half the slope; in the conv net the
    dead channels' exact zeros also tie in max pooling, where a finite difference is no gradient
    either (backward's conv and pooling gradients are checked in test_model without dead units)."""
    net, x, y = problem(method, arch, granularity=granularity)
    w_eff, _ = analytic(net, x, y)
    for layer in range(len(w_eff)):
        w, s, m, g = net.weights[layer], net.scores[layer], net.masks[layer], net.grads[layer]
        alive = m.reshape(len(m), -1).any(axis=1)
        if arch == "mlp":
            num = numeric_grad(net, w_eff, x, y, layer)
            np.testing.assert_allclose(g[alive], num[alive], rtol=1e-5, atol=1e-8, err_msg=f"dL/dW_eff, layer {layer}")
        factor = w if method == "edge-popup" else net.method.alphas[layer] * np.sign(w)
        axes = tuple(i for i, n in enumerate(s.shape) if n == 1 and w.shape[i] != 1)
        expected = reference.backward(g, factor).sum(axis=axes, keepdims=True) * np.sign(s)
        np.testing.assert_allclose(net.score_grads[layer], expected, rtol=1e-12, atol=1e-15, err_msg=f"layer {layer}")
        assert alive.any() and np.abs(net.score_grads[layer]).sum() > 0


def trained_on_both_paths(cfg: ModelConfig) -> list[tuple[Network, list[float]]]:
    """(network, losses) after three steps on NumPy and on the CuPy code path (ForeignNumpy), from
    the same seed and batches, the masks made for measuring."""
    w, s = init_network(cfg, 0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((48, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 48)
    out = []
    for xp in (np, ForeignNumpy()):
        net = Network(xp, cfg, w, s)
        opt = optim.make(xp, net.params, TrainConfig())
        losses = [float(train_step(net, opt, x[i : i + 16], y[i : i + 16], 0.1)[0]) for i in range(0, 48, 16)]
        net.effective_weights(train=False)
        out.append((net, losses))
    return out


def assert_same_state(runs) -> None:
    (a, la), (b, lb) = runs
    assert la == lb
    for x, y in ((a.s_flat, b.s_flat), (a.m_flat, b.m_flat), (a.we_flat, b.we_flat)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("granularity", ["kernel", "filter"])
def test_the_cupy_code_path_trains_units_bit_identically(granularity):
    assert_same_state(trained_on_both_paths(ModelConfig(arch="lenet", width=0.125, k=0.4, score_granularity=granularity)))


def test_a_per_unit_run_reads_evaluates_and_resumes_exactly(tmp_path, small, reference):
    extra = ("model.score_granularity=filter", "model.widths=[784,64,64,10]", "model.dense_last=true")  # (no class pruned)
    run_dir = stopped_run(tmp_path, small, *extra)
    ev = json.loads(runner.invoke(app, ["eval", str(run_dir), "--json"]).stdout)
    assert ev["matches_record"] and ev["masks_match_scores"]
    assert runner.invoke(app, ["fit", "--resume", str(run_dir), "-q"]).exit_code == 0
    assert_identical(run_dir, reference("sgd", *extra))
    report = json.loads(runner.invoke(app, ["inspect", str(run_dir), "--json"]).stdout)
    assert report["score_granularity"] == "filter" and [L["score_units"] for L in report["layers"]] == [64, 64, 10]


@pytest.mark.parametrize("overrides,fragment", [
    (["model.score_granularity=channel"], "model.score_granularity: expected one of weight, kernel, filter"),
    (["model.method=supermask", "model.score_granularity=filter"], "model.score_granularity: expected weight for supermask"),
    (["model.method=dense", "model.score_granularity=kernel"], "model.score_granularity: expected weight for dense"),
])
def test_granularity_that_cannot_apply_is_refused(tmp_path, small, overrides, fragment):
    result = runner.invoke(app, ["fit", FC, *small, *overrides, "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and fragment in result.stderr, result.output


@pytest.mark.parametrize("k_scope", ["layer", "global"])
@pytest.mark.parametrize("first,last", [(True, False), (False, True), (True, True)])
def test_dense_first_and_last_layers_keep_every_weight_on_both_code_paths(k_scope, first, last):
    runs = trained_on_both_paths(ModelConfig(widths=[784, 64, 32, 10], k=0.2, k_scope=k_scope, dense_first=first, dense_last=last))
    for net, _ in runs:
        whole = {i for i, on in ((0, first), (len(net.masks) - 1, last)) if on}
        assert all(m.all() for i, m in enumerate(net.masks) if i in whole)
        pruned = [m for i, m in enumerate(net.masks) if i not in whole]
        if k_scope == "layer":
            assert [int(m.sum()) for m in pruned] == [kept_count(0.2, m.size) for m in pruned]
        else:
            assert sum(int(m.sum()) for m in pruned) == kept_count(0.2, sum(m.size for m in pruned))
    assert runs[0][0].method.fast is not None  # the NumPy run took the fused score step
    assert_same_state(runs)


def test_dense_layers_are_refused_for_methods_without_k(tmp_path, small):
    result = runner.invoke(app, ["fit", FC, *small, "model.method=supermask", "model.dense_last=true", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "model.dense_last: expected false for supermask" in result.stderr, result.output
