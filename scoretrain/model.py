"""The score network: frozen random weights, learnable scores, a mask per layer.

edge-popup (Ramanujan et al. 2020): a weight layer uses W_eff = W * M(|S|), where M keeps the
round(k * n) weights with the largest |score| (per layer, or over the whole network with
k_scope: global) and zeroes the rest. The mask is a step function, so its gradient is passed
straight through: dL/dS = dL/dW_eff * W * sign(S) (the gradient of W * |S|, as if the mask
were the identity on |S|). No biases; ReLU between layers, none after the last.

Other methods change only how W_eff is made from (W, S) and how dL/dW_eff reaches the
learned tensor (Network._select, _combine and learned_gradient; docs/methods.md); the layers
never know which method is in use.

All array code is written against `xp` (numpy or cupy).
"""

from __future__ import annotations

import math

import numpy as np

from .backend import fused
from .config import ModelConfig

RELU_GAIN = math.sqrt(2.0)


# --- the mask ---------------------------------------------------------------------------------


def kept_count(k: float, n: int) -> int:
    """How many of n weights a fraction k keeps: round(k * n), at least one."""
    return max(1, min(n, int(round(k * n))))


def topk_mask(xp, a, k: int, hint=None, out=None, band: float = 0.01, keep=None):
    """A bool mask with exactly k True where |a| is largest, and the threshold used (the k-th
    largest |a|). Ties at the threshold go to the lowest flat indices, so the mask equals the
    first k of a stable descending sort of |a|. `hint` (the last step's threshold) and `band`
    only make it faster. With `out` (a bool array of a's shape) the mask is written there;
    with `keep` = (w, w_out), also w * mask into w_out, in the same pass on the CPU.
    On the CPU, `a` is contiguous float32."""
    flat = a.ravel()
    n = flat.size
    mask = xp.empty(flat.shape, dtype=bool) if out is None else out.reshape(flat.shape)
    w, w_out = (None, None) if keep is None else (keep[0].ravel(), keep[1].reshape(flat.shape))
    loops = fused(xp, flat, *(keep or ())) if xp is np else None
    if k >= n:
        mask[...] = True
        t = None
    elif loops is None:  # one partition and no host sync: the GPU path (and float64)
        flat = xp.abs(flat)
        t = xp.partition(flat, n - k)[n - k]
        ties = flat == t
        xp.greater(flat, t, out=mask)
        mask |= ties & (xp.cumsum(ties) <= k - xp.count_nonzero(mask))  # keep the first ties
    else:  # the CPU: fused loops, with w * mask in the same pass
        return mask.reshape(a.shape), _topk_fused(loops, flat, k, hint, band, mask, w, w_out)
    if keep is not None:
        xp.multiply(w, mask, out=w_out)
    return mask.reshape(a.shape), t


def band_bounds(hint, band: float) -> tuple[float, float]:
    """The magnitudes (lo, hi) within a relative half-width `band` of the last threshold."""
    h = float(hint)  # Python floats: NumPy scalar arithmetic costs microseconds, per step
    return h * (1 - min(band, 1.0)), h * (1 + band)


def _topk_fused(kernels, flat, k: int, hint, band: float, mask, w, w_out):
    """topk_mask on the CPU (kernels.py), returning the threshold.

    Scores move little per step, so the new threshold is near the last one: one pass
    (kernels.sweep) keeps the values above a band of relative half-width `band` around the hint,
    drops those below it, and notes those in it; if the k-th largest is among them, only they
    are partitioned (kernels.settle). A miss widens the band tenfold; a second miss, or no hint,
    partitions everything. (Network.update makes the first pass in its optimizer loop.)"""
    if hint is not None and hint > 0:
        b = kernels.Band(np.array([[0, flat.size]]), np.empty((1, 2), np.float32), mask,
                         np.empty(flat.size, np.int64), np.empty((1, 2), np.int64))
        for r in (band, 10 * band):
            b.bounds[0] = band_bounds(hint, r)
            kernels.sweep(flat, None, None, None, w, b, w_out)
            above, found = b.counts[0]
            if above < k <= above + found:
                return _settle(kernels, flat, k, above, b.index[:found], mask, w, w_out)
    bits = flat.view(np.uint32) & kernels.MAGNITUDE
    t = np.partition(bits, bits.size - k)[bits.size - k]
    kernels.keep_top(flat, t, k - np.count_nonzero(bits > t), mask, w, w_out)
    return t.view(np.float32)


def _settle(kernels, flat, k: int, above: int, index, mask, w, w_out):
    """kernels.settle, returning the threshold as a float32 (the kernel gives its bits)."""
    return np.uint32(kernels.settle(flat, k, above, index, mask, w, w_out)).view(np.float32)


# --- layers -----------------------------------------------------------------------------------
# Weight layers: forward(x, w) -> (y, cache); backward(d, cache, w, gw, need_dx) -> dx, with
# dL/dW written into gw. Other layers: forward(x) -> (y, cache); backward(d, cache) -> dx.
# Images are channels-last, [N, H, W, C]; conv weights are [out, kh, kw, in].


class Linear:
    kind = "linear"

    def __init__(self, xp, n_in: int, n_out: int):
        self.xp, self.shape, self.fan_in = xp, (n_out, n_in), n_in

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        """The output's per-sample shape for an input's, and how many more values per sample the
        layer keeps for its backward pass (the im2col patches of a conv)."""
        return (self.shape[0],), 0

    def forward(self, x, w):
        return x @ w.T, x

    def backward(self, d, x, w, gw, need_dx):
        self.xp.matmul(d.T, x, out=gw)
        return d @ w if need_dx else None


class Conv2d:
    """A k x k convolution, stride 1, zero 'same' padding, as one GEMM over im2col patches."""

    kind = "conv"

    def __init__(self, xp, c_in: int, c_out: int, k: int):
        self.xp, self.shape, self.fan_in = xp, (c_out, k, k, c_in), c_in * k * k
        self.k, self.pad = k, k // 2

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        h, w, c = shape
        return (h, w, self.shape[0]), h * w * self.k * self.k * c

    def forward(self, x, w):
        xp, k, p = self.xp, self.k, self.pad
        n, h, wd, c = x.shape
        padded = xp.zeros((n, h + 2 * p, wd + 2 * p, c), dtype=x.dtype)
        padded[:, p : p + h, p : p + wd] = x
        # im2col as a strided view [n, h, w, k, k, c] of the padded input; the reshape copies it once
        sn, sh, sw, sc = padded.strides
        cols = xp.lib.stride_tricks.as_strided(padded, (n, h, wd, k, k, c), (sn, sh, sw, sh, sw, sc))
        cols = cols.reshape(n * h * wd, k * k * c)
        y = cols @ w.reshape(len(w), -1).T
        return y.reshape(n, h, wd, len(w)), (cols, x.shape)

    def backward(self, d, cache, w, gw, need_dx):
        xp, k, p = self.xp, self.k, self.pad
        cols, (n, h, wd, c) = cache
        d2 = d.reshape(-1, len(w))
        xp.matmul(d2.T, cols, out=gw.reshape(len(w), -1))
        if not need_dx:
            return None
        dcols = (d2 @ w.reshape(len(w), -1)).reshape(n, h, wd, k, k, c)
        dx = xp.zeros((n, h + 2 * p, wd + 2 * p, c), dtype=d.dtype)
        for i in range(k):  # col2im: each patch adds its gradient back where it was read
            for j in range(k):
                dx[:, i : i + h, j : j + wd] += dcols[:, :, :, i, j]
        return dx[:, p : p + h, p : p + wd]


class ReLU:
    def __init__(self, xp):
        self.xp = xp

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        return shape, 0

    def forward(self, x):
        y = self.xp.maximum(x, 0, out=x)  # in place: x is always the previous layer's own output
        return y, y

    def backward(self, d, y):
        return d * (y > 0)


class MaxPool2d:
    """2 x 2 max pooling, stride 2 (an odd last row/column is dropped, as in PyTorch)."""

    def __init__(self, xp):
        self.xp = xp

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        h, w, c = shape
        return (h // 2, w // 2, c), 0

    @staticmethod
    def _corners(x):
        """The four strided views x[:, a::2, b::2] of each 2 x 2 window, in row-major order."""
        h2, w2 = x.shape[1] // 2, x.shape[2] // 2
        return [x[:, a : 2 * h2 : 2, b : 2 * w2 : 2] for a in (0, 1) for b in (0, 1)]

    def forward(self, x):
        c = self._corners(x)
        y = self.xp.maximum(self.xp.maximum(c[0], c[1]), self.xp.maximum(c[2], c[3]))
        return y, (x, y)

    def backward(self, d, cache):
        xp = self.xp
        x, y = cache
        dx = xp.zeros(x.shape, dtype=d.dtype)
        taken = xp.zeros(y.shape, dtype=bool)
        for corner, dcorner in zip(self._corners(x), self._corners(dx)):
            hit = corner == y  # the gradient goes to the first maximum of each window only
            hit &= ~taken
            taken |= hit
            dcorner[...] = d * hit
        return dx


class Flatten:
    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        return (math.prod(shape),), 0

    def forward(self, x):
        return x.reshape(len(x), -1), x.shape

    def backward(self, d, shape):
        return d.reshape(shape)


# The VGG-like nets of the lottery-ticket and edge-popup papers (3x3 convs, 'M' = 2x2 max
# pool, then fully connected layers), and a LeNet-style net (5x5 convs) for MNIST.
ARCHS = {
    "conv2": (3, [64, 64, "M"], [256, 256]),
    "conv4": (3, [64, 64, "M", 128, 128, "M"], [256, 256]),
    "conv6": (3, [64, 64, "M", 128, 128, "M", 256, 256, "M"], [256, 256]),
    "conv8": (3, [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"], [256, 256]),
    "lenet": (5, [32, "M", 64, "M"], [512]),
}


def build_layers(xp, cfg: ModelConfig, image_shape: tuple[int, int, int], n_classes: int) -> list:
    """The layer list of `cfg.arch` for [N, H, W, C] inputs. `mlp` takes its widths from
    cfg.widths; the conv nets scale every channel count and hidden width by cfg.width."""
    h, w, c = image_shape
    layers = []
    if cfg.arch == "mlp":
        widths = cfg.widths
    else:
        k, convs, fcs = ARCHS[cfg.arch]
        scale = lambda n: max(1, int(round(n * cfg.width)))  # noqa: E731
        for item in convs:
            if item == "M":
                layers.append(MaxPool2d(xp))
                h, w = h // 2, w // 2
            else:
                layers += [Conv2d(xp, c, scale(item), k), ReLU(xp)]
                c = scale(item)
        widths = [h * w * c] + [scale(n) for n in fcs] + [n_classes]
    layers.append(Flatten())
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(Linear(xp, n_in, n_out))
        if i < len(widths) - 2:
            layers.append(ReLU(xp))
    return layers


# --- initialization (on the host, so a seed gives the same network on every backend) ----------


def init_network(cfg: ModelConfig, seed: int, image_shape=(28, 28, 1), n_classes: int = 10):
    """Host float32 weights (and scores, for the methods that learn them) for a seed. The
    weights are drawn first, so every method of one seed starts from the same random network."""
    rng = np.random.default_rng(seed)
    weighted = [l for l in build_layers(np, cfg, image_shape, n_classes) if hasattr(l, "shape")]
    weights = []
    for layer in weighted:
        fan = layer.fan_in * cfg.k if cfg.scale_fan else layer.fan_in
        std = RELU_GAIN / math.sqrt(fan)
        if cfg.init == "signed_constant":
            w = np.where(rng.random(layer.shape) < 0.5, -std, std)
        elif cfg.init == "kaiming_normal":
            w = rng.standard_normal(layer.shape) * std
        else:  # kaiming_uniform
            w = rng.uniform(-math.sqrt(3.0) * std, math.sqrt(3.0) * std, layer.shape)
        weights.append(w.astype(np.float32))
    if cfg.method == "dense":
        return weights, None
    scores = []
    for layer in weighted:
        if cfg.score_init == "kaiming_uniform":  # PyTorch's default layer init, as the reference code
            bound = 1.0 / math.sqrt(layer.fan_in)
            s = rng.uniform(-bound, bound, layer.shape)
        else:  # kaiming_normal
            s = rng.standard_normal(layer.shape) * (RELU_GAIN / math.sqrt(layer.fan_in))
        scores.append(s.astype(np.float32))
    return weights, scores


# --- the network ------------------------------------------------------------------------------


def _views(flat, shapes: list) -> list:
    out, at = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[at : at + n].reshape(shape))
        at += n
    return out


class Network:
    """The layers, the frozen or learned tensors, and the method that turns them into the
    effective weights W_eff and carries dL/dW_eff back to the learned tensor.

    Each kind of tensor (weights, scores, masks, gradients, W_eff) is one flat device buffer,
    with a view per layer: the optimizer updates one array, a global top-k is one selection,
    and a step allocates nothing that grows with the network."""

    def __init__(self, xp, cfg: ModelConfig, weights: list, scores: list | None,
                 image_shape=(28, 28, 1), n_classes: int = 10):
        self.xp, self.method = xp, cfg.method
        self.layers = build_layers(xp, cfg, image_shape, n_classes)
        self.weighted = [i for i, l in enumerate(self.layers) if hasattr(l, "shape")]
        shapes = [self.layers[i].shape for i in self.weighted]
        flat = lambda arrays: xp.concatenate([xp.asarray(a).ravel() for a in arrays])  # noqa: E731 - a device copy
        self.w_flat = flat(weights)
        self.weights = _views(self.w_flat, shapes)
        self.g_flat = xp.empty_like(self.w_flat)
        self.grads = _views(self.g_flat, shapes)
        self.scores = self.masks = self.sweep = None
        if self.method == "dense":
            return
        self.s_flat = flat(scores)
        self.scores = _views(self.s_flat, shapes)
        self.m_flat = xp.empty(self.w_flat.shape, dtype=bool)
        self.masks = _views(self.m_flat, shapes)
        self.we_flat = xp.empty_like(self.w_flat)
        self.w_eff = _views(self.we_flat, shapes)
        self._tmp = xp.empty_like(self.w_flat)
        sizes = [int(np.prod(s)) for s in shapes]
        ends = np.cumsum(sizes).tolist()
        bounds = list(zip([0] + ends[:-1], ends))
        self.groups = [(0, ends[-1])] if cfg.k_scope == "global" else bounds  # one top-k per group
        self.kept = [kept_count(cfg.k, hi - lo) for lo, hi in self.groups]
        self.thresholds = [None] * len(self.groups)  # last step's: a hint for the next selection
        self.bands = [0.01] * len(self.groups)  # where the hint's band starts (CPU), from the last move
        if self.method == "edge-popup" and xp is np and fused(xp, self.s_flat):  # what update()'s sweep finds
            self.sweep = fused(xp).Band(np.array(self.groups, np.int64), np.zeros((len(self.groups), 2), np.float32),
                                        self.m_flat, np.empty(self.s_flat.size, np.int64), np.full((len(self.groups), 2), -1))
        self.layer_bounds = bounds
        if self.method == "biprop":
            self.w_sign = xp.sign(self.w_flat)
            self.w_abs = xp.abs(self.w_flat)
            self.alphas = [None] * len(shapes)
        self.rng = None  # supermask: a Generator set by reseed() at each epoch

    @property
    def params(self) -> list:
        """What the optimizer updates: one flat tensor."""
        return [self.w_flat if self.method == "dense" else self.s_flat]

    def reseed(self, seed: int, epoch: int) -> None:
        """The supermask's sampling stream for an epoch: a function of (seed, epoch) only, so a
        resumed run samples the same masks."""
        if self.method == "supermask":
            self.rng = self.xp.random.default_rng(int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0]))
            self.measure_seed = int(np.random.SeedSequence([seed, epoch, 3]).generate_state(1)[0])

    def effective_weights(self, train: bool = True) -> list:
        """W_eff per layer (views of one buffer); the masks are kept in self.masks."""
        if self.method == "dense":
            return self.weights
        self._select(train)
        return self.w_eff if self.method == "edge-popup" else self._combine()  # edge-popup's: made by _select

    def subnetwork(self, masks: list) -> list:
        """W_eff for given masks (a stored run's), instead of the scores' own."""
        for buf, m in zip(self.masks, masks):
            buf[...] = self.xp.asarray(m)
        return self._combine()

    def _select(self, train: bool) -> None:
        xp = self.xp
        if self.method == "supermask":
            # Zhou et al.: M ~ Bernoulli(sigmoid(S)), a fresh sample every step. Measuring uses one
            # sample too, fixed per (seed, epoch) so that it is reproducible and can be stored: the
            # most likely mask (S > 0) keeps every weight with p > 0.5 at full strength, a network
            # training never saw, and measures far worse.
            if self.rng is None:
                self.reseed(0, 0)
            if train:
                u = self.rng.random(self.s_flat.shape, dtype=np.float32)
            else:  # drawn on the host (once an epoch): the same stored mask on NumPy and CuPy
                u = xp.asarray(np.random.default_rng(self.measure_seed).random(self.s_flat.shape, dtype=np.float32))
            xp.less(u, sigmoid(xp, self.s_flat, out=self._tmp), out=self.m_flat)
        else:  # edge-popup, biprop: exact top-k of |S| per group
            with_w_eff = self.method == "edge-popup"  # W_eff = W * M in the same pass (biprop's needs alpha)
            counts = [(-1, -1)] * len(self.groups) if self.sweep is None else self.sweep.counts.tolist()
            for g, (lo, hi) in enumerate(self.groups):
                hint, k, (above, found) = self.thresholds[g], self.kept[g], counts[g]
                if hint and above < k <= above + found:  # update() swept the scores, and the band holds the k-th
                    t = _settle(fused(xp), self.s_flat[lo:hi], k, above, self.sweep.index[lo : lo + found],
                                self.m_flat[lo:hi], self.w_flat[lo:hi], self.we_flat[lo:hi])
                else:
                    keep = (self.w_flat[lo:hi], self.we_flat[lo:hi]) if with_w_eff else None
                    _, t = topk_mask(xp, self.s_flat[lo:hi], k, hint, self.m_flat[lo:hi], self.bands[g], keep)
                if xp is np and hint and t:  # the next band (CPU): a few times this step's move
                    self.bands[g] = min(0.1, max(1e-3, 4 * abs(float(t) / float(hint) - 1)))
                self.thresholds[g] = t
            if self.sweep is not None:
                self.sweep.counts[:] = -1  # used once (and -1 never hits): the scores change before the next sweep

    def _combine(self) -> list:
        xp = self.xp
        if self.method == "biprop":
            # Diffenderfer & Kailkhura: W_eff = alpha * sign(W) * M, alpha = mean |W| of the kept
            for i, (lo, hi) in enumerate(self.layer_bounds):
                m = self.m_flat[lo:hi]
                self.alphas[i] = (self.w_abs[lo:hi] * m).sum() / xp.maximum(m.sum(), 1)
                xp.multiply(self.w_sign[lo:hi], m, out=self.we_flat[lo:hi])
                self.we_flat[lo:hi] *= self.alphas[i]
        elif xp is np and fused(xp, self.w_flat):
            fused(xp).masked(self.w_flat, self.m_flat, self.we_flat)
        else:
            xp.multiply(self.w_flat, self.m_flat, out=self.we_flat)
        return self.w_eff

    def forward(self, x, w_eff: list):
        """Logits, and what each layer keeps for the backward pass."""
        caches, wi = [], 0
        for layer in self.layers:
            if hasattr(layer, "shape"):
                x, cache = layer.forward(x, w_eff[wi])
                wi += 1
            else:
                x, cache = layer.forward(x)
            caches.append(cache)
        return x, caches

    def backward(self, caches: list, w_eff: list, dlogits) -> None:
        """dL/dW_eff, from dL/dlogits, into self.grads (views of self.g_flat)."""
        d, wi = dlogits, len(self.weighted) - 1
        for i in reversed(range(self.weighted[0], len(self.layers))):
            layer = self.layers[i]
            if hasattr(layer, "shape"):
                d = layer.backward(d, caches[i], w_eff[wi], self.grads[wi], need_dx=i > self.weighted[0])
                wi -= 1
            else:
                d = layer.backward(d, caches[i])

    def update(self, opt, lr: float) -> None:
        """The optimizer's step on `params`, from backward's dL/dW_eff. On the CPU, edge-popup's
        straight-through gradient, the update and the next top-k's pass over the new scores are
        one loop (kernels.sweep, against each group's band), which leaves the next _select only
        the values in each band to settle. Until then the masks and W_eff are that loop's partial
        result: read them after effective_weights()."""
        if self.sweep is None:
            opt.step(self.params, self.learned_gradient(), lr)
            return
        self.sweep.bounds[:] = [band_bounds(hint or 0.0, r) for hint, r in zip(self.thresholds, self.bands)]
        opt.step(self.params, [self.g_flat], lr, w=self.w_flat, band=self.sweep, out=self.we_flat)

    def learned_gradient(self) -> list:
        """dL/dW_eff (backward's) -> dL/d(learned tensor), in place, straight through the mask:
        the gradients of `params`."""
        xp, g = self.xp, self.g_flat
        if self.method == "edge-popup":  # W_eff = W * M(|S|) ~ W * |S|
            straight_through(xp, g, self.w_flat, self.s_flat, self._tmp)
        elif self.method == "biprop":  # W_eff = alpha * sign(W) * M(|S|), alpha held constant
            straight_through(xp, g, self.w_sign, self.s_flat, self._tmp)
            for i, (lo, hi) in enumerate(self.layer_bounds):
                g[lo:hi] *= self.alphas[i]
        elif self.method == "supermask":  # W_eff = W * M, E[M] = sigmoid(S)
            p = sigmoid(xp, self.s_flat, out=self._tmp)
            g *= self.w_flat
            g *= p
            g *= 1 - p
        return [g]


def straight_through(xp, g, w, s, scratch) -> None:
    """g *= w * sign(s), in place: dL/dW_eff -> dL/dS through W_eff = w * |s|."""
    loops = fused(xp, g, w, s)
    if loops:
        loops.straight_through(g, w, s)
    else:
        g *= w
        times_sign(xp, g, s, scratch)


def times_sign(xp, g, s, scratch) -> None:
    """g *= sign(s), in place, by XOR-ing s's sign bit into g's: exact, and about 3x faster than
    multiplying by xp.sign(s), the slowest elementwise op of a step. Where s == 0, g is kept
    (the straight-through derivative of |s| at 0 is a convention either way)."""
    uint = {4: xp.uint32, 8: xp.uint64}[g.dtype.itemsize]
    sign_bit = uint(1 << (8 * g.dtype.itemsize - 1))
    bits = xp.bitwise_and(s.view(uint), sign_bit, out=scratch.view(uint))
    xp.bitwise_xor(g.view(uint), bits, out=g.view(uint))


def sigmoid(xp, x, out=None):
    out = xp.negative(x, out=out)
    xp.exp(out, out=out)
    out += 1
    return xp.reciprocal(out, out=out)


def cross_entropy(xp, logits, y, grad: bool = True):
    """Summed loss, number correct (both 0-d device arrays) and dL/dlogits of the *mean* loss."""
    n = logits.shape[0]
    rows = xp.arange(n)
    z = logits - logits.max(axis=1, keepdims=True)
    e = xp.exp(z)
    s = e.sum(axis=1, keepdims=True)
    loss_sum = (xp.log(s[:, 0]) - z[rows, y]).sum()
    correct = (logits.argmax(axis=1) == y).sum()
    if not grad:
        return loss_sum, correct, None
    p = e / s
    p[rows, y] -= 1.0
    p /= n
    return loss_sum, correct, p
