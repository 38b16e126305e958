"""The score network: frozen random weights, learnable scores, a top-k mask per layer.

edge-popup (Ramanujan et al. 2020): layer l computes x @ (W * M(|S|)).T, where M keeps the
round(k * n) weights with the largest |score| and zeroes the rest. The mask is a step
function, so its gradient is passed straight through: dL/dS = dL/dW_eff * W * sign(S)
(the gradient of W * |S|, as if the mask were the identity on |S|). No biases; ReLU between
layers, none after the last. `method: dense` trains W itself: the ordinary network.

All array code is written against `xp` (numpy or cupy).
"""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig

RELU_GAIN = math.sqrt(2.0)


# --- the mask ---------------------------------------------------------------------------------


def kept_count(k: float, n: int) -> int:
    """How many of a layer's n weights a fraction k keeps: round(k * n), at least one."""
    return max(1, min(n, int(round(k * n))))


def topk_mask(xp, a, k: int, hint=None, out=None):
    """A bool mask with exactly k True where `a` (>= 0) is largest, and the threshold used.
    Ties at the threshold go to the lowest flat indices, so the mask equals the first k of a
    stable descending sort. `hint` (the last step's threshold) only makes it faster."""
    flat = a.ravel()
    n = flat.size
    if k >= n:
        return xp.ones(a.shape, dtype=bool), None
    if xp is not np:  # one partition and no host sync: the GPU path
        t = xp.partition(flat, n - k)[n - k]
        mask = flat > t
        ties = flat == t
        mask |= ties & (xp.cumsum(ties) <= k - xp.count_nonzero(mask))  # keep the first ties
        return mask.reshape(a.shape), t
    t, n_gt, n_eq = kth_largest(flat, k, hint)
    if n_gt + n_eq == k:  # no tie straddles the threshold: one pass
        mask = np.greater_equal(flat, t, out=None if out is None else out.ravel())
    else:
        mask = flat > t
        mask[np.flatnonzero(flat == t)[: k - n_gt]] = True
    return mask.reshape(a.shape), t


BAND = 0.01  # first try: values within 1% of the hint


def kth_largest(flat: np.ndarray, k: int, hint=None) -> tuple[float, int, int]:
    """The k-th largest value t of `flat`, with count(flat > t) and count(flat == t).

    Scores move little per step, so the new threshold is near the last one: partition only
    the values in a band around the hint, after checking by a count that the band holds the
    k-th largest. A miss widens the band; two misses fall back to partitioning everything.
    """
    if hint is not None and hint > 0:
        for r in (BAND, 8 * BAND):
            lo, hi = hint * (1 - r), hint * (1 + r)
            above = np.count_nonzero(flat > hi)
            if above < k:
                band = flat[(flat >= lo) & (flat <= hi)]
                if above + band.size >= k:
                    return _kth(band, k - above, above)
    return _kth(flat, k, 0)


def _kth(values: np.ndarray, k: int, above: int) -> tuple[float, int, int]:
    t = np.partition(values, values.size - k)[values.size - k]
    return t, above + np.count_nonzero(values > t), np.count_nonzero(values == t)


# --- initialization (on the host, so a seed gives the same network on every backend) ----------


def init_weights(rng: np.random.Generator, cfg: ModelConfig) -> list[np.ndarray]:
    weights = []
    for fan_in, fan_out in zip(cfg.widths[:-1], cfg.widths[1:]):
        fan = fan_in * cfg.k if cfg.scale_fan else fan_in
        std = RELU_GAIN / math.sqrt(fan)
        shape = (fan_out, fan_in)
        if cfg.init == "signed_constant":
            w = np.where(rng.random(shape) < 0.5, -std, std)
        elif cfg.init == "kaiming_normal":
            w = rng.standard_normal(shape) * std
        else:  # kaiming_uniform
            w = rng.uniform(-math.sqrt(3.0) * std, math.sqrt(3.0) * std, shape)
        weights.append(w.astype(np.float32))
    return weights


def init_network(cfg: ModelConfig, seed: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Host float32 weights (and scores for edge-popup) for a seed. The weights are drawn first,
    so edge-popup and dense runs of one seed start from the same random network."""
    rng = np.random.default_rng(seed)
    weights = init_weights(rng, cfg)
    return weights, (init_scores(rng, cfg) if cfg.method == "edge-popup" else None)


def init_scores(rng: np.random.Generator, cfg: ModelConfig) -> list[np.ndarray]:
    scores = []
    for fan_in, fan_out in zip(cfg.widths[:-1], cfg.widths[1:]):
        shape = (fan_out, fan_in)
        if cfg.score_init == "kaiming_uniform":  # PyTorch's default Linear init, as the reference code
            bound = 1.0 / math.sqrt(fan_in)
            s = rng.uniform(-bound, bound, shape)
        else:  # kaiming_normal
            s = rng.standard_normal(shape) * (RELU_GAIN / math.sqrt(fan_in))
        scores.append(s.astype(np.float32))
    return scores


# --- the network ------------------------------------------------------------------------------


class Network:
    """An MLP of score layers. `params` are the arrays the optimizer updates: the scores for
    edge-popup, the weights for dense. The per-step arrays (|S|, W_eff, gradients) live in
    buffers allocated once, so a step allocates nothing that grows with the network."""

    def __init__(self, xp, method: str, k: float, weights: list, scores: list | None):
        self.xp = xp
        self.method = method
        self.k = k
        self.weights = weights
        self.scores = scores if method == "edge-popup" else None
        self.grads = [xp.empty_like(w) for w in weights]
        if self.scores is not None:
            self.kept = [kept_count(k, w.size) for w in weights]
            self.thresholds = [None] * len(weights)  # last step's, a hint for the next selection
            self.masks = [xp.empty(w.shape, dtype=bool) for w in weights]
            self._abs = [xp.empty_like(w) for w in weights]
            self._sign = [xp.empty_like(w) for w in weights]
            self._w_eff = [xp.empty_like(w) for w in weights]

    @property
    def params(self) -> list:
        return self.scores if self.scores is not None else self.weights

    def effective_weights(self) -> list:
        """W * M(|S|) for each layer (W itself for dense); the masks are kept in self.masks."""
        if self.scores is None:
            return self.weights
        xp = self.xp
        for i, (w, s) in enumerate(zip(self.weights, self.scores)):
            a = xp.abs(s, out=self._abs[i])
            self.masks[i], self.thresholds[i] = topk_mask(xp, a, self.kept[i], self.thresholds[i], out=self.masks[i])
            xp.multiply(w, self.masks[i], out=self._w_eff[i])
        return self._w_eff

    def forward(self, x, w_eff: list):
        """Logits, and the inputs of every layer (kept for the backward pass)."""
        acts = [x]
        h = x
        for i, w in enumerate(w_eff):
            h = h @ w.T
            if i < len(w_eff) - 1:
                self.xp.maximum(h, 0, out=h)  # ReLU, in place: h is this step's own array
                acts.append(h)
        return h, acts

    def backward(self, acts: list, w_eff: list, dlogits) -> list:
        """Gradients of the loss with respect to `params`, from dL/dlogits (in self.grads)."""
        xp = self.xp
        d = dlogits
        for i in reversed(range(len(w_eff))):
            g = xp.matmul(d.T, acts[i], out=self.grads[i])  # dL/dW_eff, [out, in]
            if self.scores is not None:
                g *= self.weights[i]  # straight through the mask ...
                g *= xp.sign(self.scores[i], out=self._sign[i])  # ... and through |S|
            if i > 0:  # no gradient wanted for the data
                d = d @ w_eff[i]
                d *= acts[i] > 0  # ReLU
        return self.grads


def cross_entropy(xp, logits, y):
    """Summed loss, number correct (both 0-d device arrays) and dL/dlogits of the *mean* loss."""
    n = logits.shape[0]
    rows = xp.arange(n)
    z = logits - logits.max(axis=1, keepdims=True)
    e = xp.exp(z)
    s = e.sum(axis=1, keepdims=True)
    loss_sum = (xp.log(s[:, 0]) - z[rows, y]).sum()
    correct = (logits.argmax(axis=1) == y).sum()
    p = e / s
    p[rows, y] -= 1.0
    p /= n
    return loss_sum, correct, p
