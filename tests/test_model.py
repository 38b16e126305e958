"""The algorithm's numerics: exact top-k masks, straight-through gradients, finite differences."""

import numpy as np
import pytest

from scoretrain.config import ModelConfig
from scoretrain.model import Network, cross_entropy, init_network, kept_count, topk_mask


def stable_topk(a, k):
    """Reference: the first k of a stable descending sort (ties -> lower index first)."""
    order = np.argsort(-a.ravel(), kind="stable")
    mask = np.zeros(a.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(a.shape)


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (1000, 500), (1000, 1), (1000, 999), (1000, 1000), (7919, 2000)])
def test_topk_matches_sort_on_random_scores(n, k):
    a = np.abs(np.random.default_rng(n + k).standard_normal(n)).astype(np.float32)
    mask, _ = topk_mask(np, a, k)
    assert mask.sum() == k
    np.testing.assert_array_equal(mask, stable_topk(a, k))


@pytest.mark.parametrize("k", [1, 5, 50, 333, 600, 999])
def test_topk_is_exact_and_deterministic_on_tie_heavy_scores(k):
    a = np.random.default_rng(k).integers(0, 4, size=(30, 40)).astype(np.float32)  # 4 distinct values
    mask, _ = topk_mask(np, a, k)
    assert mask.shape == a.shape and mask.sum() == k
    np.testing.assert_array_equal(mask, stable_topk(a, k))


def test_all_equal_scores_keep_the_first_k():
    mask, _ = topk_mask(np, np.zeros(10, np.float32), 4)
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("k,n,expected", [(0.5, 10, 5), (0.3, 10, 3), (0.25, 10, 2), (0.35, 10, 4), (0.01, 10, 1), (1.0, 7, 7)])
def test_kept_count_is_round_k_n(k, n, expected):
    assert kept_count(k, n) == expected


def test_network_masks_have_exact_sizes():
    cfg = ModelConfig(widths=[784, 250, 250, 10], k=0.3)
    w, s = init_network(cfg, seed=3)
    net = Network(np, "edge-popup", cfg.k, w, s)
    w_eff = net.effective_weights()
    for m, we, weight in zip(net.masks, w_eff, w):
        assert m.sum() == round(0.3 * weight.size)
        np.testing.assert_array_equal(we != 0, m)  # signed-constant weights are never 0 themselves


def test_signed_constant_init_and_seed_reproducibility():
    cfg = ModelConfig(widths=[20, 30, 10], init="signed_constant")
    w1, s1 = init_network(cfg, seed=7)
    w2, s2 = init_network(cfg, seed=7)
    w3, _ = init_network(cfg, seed=8)
    for a, b in zip(w1 + s1, w2 + s2):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(w1[0], w3[0])
    std = np.sqrt(2.0 / 20)
    np.testing.assert_allclose(np.unique(np.abs(w1[0])), [std], rtol=1e-6)
    scaled, _ = init_network(ModelConfig(widths=[20, 30, 10], k=0.5, scale_fan=True), seed=7)
    np.testing.assert_allclose(np.abs(scaled[0]), np.sqrt(2.0 / (0.5 * 20)), rtol=1e-6)


def test_dense_and_edge_popup_share_the_random_weights():
    w_ep, _ = init_network(ModelConfig(method="edge-popup", widths=[20, 30, 10]), seed=1)
    w_d, s_d = init_network(ModelConfig(method="dense", widths=[20, 30, 10]), seed=1)
    assert s_d is None
    for a, b in zip(w_ep, w_d):
        np.testing.assert_array_equal(a, b)


def loss_of(net, w_eff, x, y):
    logits, _ = net.forward(x, w_eff)
    loss_sum, _, _ = cross_entropy(np, logits, y)
    return float(loss_sum) / len(y)


def small_problem(method, seed=0):
    rng = np.random.default_rng(seed)
    cfg = ModelConfig(method=method, widths=[6, 8, 7, 3], k=0.5, init="kaiming_normal")
    w, s = init_network(cfg, seed)
    w = [a.astype(np.float64) for a in w]
    s = None if s is None else [a.astype(np.float64) for a in s]
    x = rng.standard_normal((5, 6))
    y = rng.integers(0, 3, 5)
    return Network(np, method, cfg.k, w, s), x, y


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


def test_dense_weight_gradients_match_finite_differences():
    net, x, y = small_problem("dense")
    w_eff = net.effective_weights()
    logits, acts = net.forward(x, w_eff)
    grads = net.backward(acts, w_eff, cross_entropy(np, logits, y)[2])
    eps = 1e-6
    for layer, (w, g) in enumerate(zip(net.weights, grads)):
        num = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            old = w[idx]
            w[idx] = old + eps
            up = loss_of(net, net.weights, x, y)
            w[idx] = old - eps
            down = loss_of(net, net.weights, x, y)
            w[idx] = old
            num[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8, err_msg=f"layer {layer}")


def test_score_gradient_is_straight_through_the_mask():
    """dL/dS must equal dL/dW_eff * W * sign(S), with dL/dW_eff checked by finite differences
    on the masked network (the gradient the mask is treated as passing unchanged)."""
    net, x, y = small_problem("edge-popup")
    w_eff = net.effective_weights()
    logits, acts = net.forward(x, w_eff)
    grads = net.backward(acts, w_eff, cross_entropy(np, logits, y)[2])
    eps = 1e-6
    for layer in range(len(w_eff)):
        num = np.zeros_like(w_eff[layer])
        for idx in np.ndindex(num.shape):
            probe = [a.copy() for a in w_eff]
            probe[layer][idx] += eps
            up = loss_of(net, probe, x, y)
            probe[layer][idx] -= 2 * eps
            num[idx] = (up - loss_of(net, probe, x, y)) / (2 * eps)
        expected = num * net.weights[layer] * np.sign(net.scores[layer])
        np.testing.assert_allclose(grads[layer], expected, rtol=1e-5, atol=1e-8, err_msg=f"layer {layer}")
        assert np.abs(grads[layer][~net.masks[layer]]).sum() > 0  # pruned weights' scores get gradient too


def test_scores_decide_the_mask_not_the_weights():
    net, _, _ = small_problem("edge-popup")
    before = [m.copy() for m in (net.effective_weights() and net.masks)]
    net.scores[0][:] = 0.0
    net.scores[0][0, :3] = 5.0  # these must now be among the kept
    net.effective_weights()
    assert net.masks[0][0, :3].all()
    assert not np.array_equal(before[0], net.masks[0])


@pytest.mark.parametrize("hint_scale", [None, 0.0, 0.5, 0.99, 1.0, 1.005, 1.05, 2.0, 100.0])
def test_threshold_hint_changes_speed_never_the_mask(hint_scale):
    rng = np.random.default_rng(1)
    for a in (np.abs(rng.standard_normal(20000)).astype(np.float32),
              rng.integers(0, 50, 20000).astype(np.float32)):  # tie-heavy
        for k in (1, 137, 10000, 19999):
            exact = np.sort(a)[::-1][k - 1]
            hint = None if hint_scale is None else np.float32(exact * hint_scale)
            mask, t = topk_mask(np, a, k, hint)
            assert t == exact and mask.sum() == k
            np.testing.assert_array_equal(mask, stable_topk(a, k))


def test_hint_from_the_last_step_stays_exact_as_scores_move():
    """The training pattern: each step's threshold is the next step's hint."""
    rng = np.random.default_rng(2)
    s = rng.uniform(-0.05, 0.05, 50000).astype(np.float32)
    hint = None
    for _ in range(30):
        s += rng.normal(0, 1e-4, s.size).astype(np.float32)
        a = np.abs(s)
        mask, hint = topk_mask(np, a, 25000, hint)
        np.testing.assert_array_equal(mask, stable_topk(a, 25000))
