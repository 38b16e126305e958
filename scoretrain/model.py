"""The score network: layers, architectures, initialization, and the Network that holds the frozen
weights, the learned tensor and the masks as flat buffers.

Every weight layer computes with effective weights W_eff instead of its frozen random weights W;
how W_eff is made and how dL/dW_eff reaches what is learned is the network's method
(methods.py: edge-popup, biprop, supermask, dense). The layers never know which method is in
use. No biases; ReLU between layers, none after the last.

All array code is written against `xp` (numpy or cupy).
"""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig
from .methods import METHODS

RELU_GAIN = math.sqrt(2.0)


# --- layers -----------------------------------------------------------------------------------
# Weight layers: forward(x, w) -> (y, cache); backward(d, cache, w, gw, need_dx) -> dx, with
# dL/dW written into gw. Other layers: forward(x) -> (y, cache); backward(d, cache) -> dx.
# Every layer says its output shape (output_shape) and describes itself for `export` (describe).
# Images are channels-last, [N, H, W, C]; conv weights are [out, kh, kw, in].


class Linear:
    kind = "linear"

    def __init__(self, xp, n_in: int, n_out: int):
        self.xp, self.shape, self.fan_in = xp, (n_out, n_in), n_in

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        """The output's per-sample shape for an input's, and how many more values per sample the
        layer keeps for its backward pass (the im2col patches of a conv)."""
        return (self.shape[0],), 0

    def describe(self) -> dict:
        """What export writes of the layer: x @ W.T, no bias."""
        return {"type": "linear", "shape": list(self.shape)}

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

    def describe(self) -> dict:
        return {"type": "conv", "shape": list(self.shape), "padding": "same", "stride": 1}

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

    def describe(self) -> dict:
        return {"type": "relu"}

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

    def describe(self) -> dict:
        return {"type": "maxpool", "size": 2, "stride": 2}

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

    def describe(self) -> dict:
        return {"type": "flatten"}

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


def draw_weights(rng: np.random.Generator, cfg: ModelConfig, layer) -> np.ndarray:
    """A weight layer's random weights, float32, as cfg.init says (and IteRand redraws them)."""
    fan = layer.fan_in * cfg.k if cfg.scale_fan else layer.fan_in
    std = RELU_GAIN / math.sqrt(fan)
    if cfg.init == "signed_constant":
        w = np.where(rng.random(layer.shape) < 0.5, -std, std)
    elif cfg.init == "kaiming_normal":
        w = rng.standard_normal(layer.shape) * std
    else:  # kaiming_uniform
        w = rng.uniform(-math.sqrt(3.0) * std, math.sqrt(3.0) * std, layer.shape)
    return w.astype(np.float32)


def init_network(cfg: ModelConfig, seed: int, image_shape=(28, 28, 1), n_classes: int = 10):
    """Host float32 weights (and scores, for the methods that learn them) for a seed. The
    weights are drawn first, so every method of one seed starts from the same random network."""
    rng = np.random.default_rng(seed)
    weighted = [l for l in build_layers(np, cfg, image_shape, n_classes) if hasattr(l, "shape")]
    weights = [draw_weights(rng, cfg, layer) for layer in weighted]
    if METHODS[cfg.method].learns == "weights":
        return weights, None
    scores = []
    for layer in weighted:
        shape = score_shape(layer.shape, cfg.score_granularity)
        if cfg.score_init == "kaiming_uniform":  # PyTorch's default layer init, as the reference code
            bound = 1.0 / math.sqrt(layer.fan_in)
            s = rng.uniform(-bound, bound, shape)
        else:  # kaiming_normal
            s = rng.standard_normal(shape) * (RELU_GAIN / math.sqrt(layer.fan_in))
        scores.append(s.astype(np.float32))
    return weights, scores


def score_shape(shape: tuple, granularity: str) -> tuple:
    """The shape of a weight layer's scores (model.score_granularity): one score per weight
    (`weight`), per (out, in) kernel of a conv [out, 1, 1, in] (`kernel`; a linear layer's
    kernels are its weights), or per output filter or unit [out, 1, ...] (`filter`). A score
    covers the weights it broadcasts over."""
    if granularity == "weight" or granularity == "kernel" and len(shape) == 2:
        return tuple(shape)
    if granularity == "kernel":
        return (shape[0], 1, 1, shape[3])
    return (shape[0],) + (1,) * (len(shape) - 1)


# --- the network ------------------------------------------------------------------------------


def _views(flat, shapes: list) -> list:
    out, at = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[at : at + n].reshape(shape))
        at += n
    return out


class Network:
    """The layers, the frozen or learned tensors, and the method (methods.py) that turns them into
    the effective weights W_eff and carries dL/dW_eff back to the learned tensor.

    Each kind of tensor (weights, scores, masks, gradients, W_eff) is one flat device buffer,
    with a view per layer: the optimizer updates one array, a global top-k is one selection,
    and a step allocates nothing that grows with the network."""

    def __init__(self, xp, cfg: ModelConfig, weights: list, scores: list | None,
                 image_shape=(28, 28, 1), n_classes: int = 10):
        self.xp = xp
        self.layers = build_layers(xp, cfg, image_shape, n_classes)
        self.weighted = [i for i, l in enumerate(self.layers) if hasattr(l, "shape")]
        shapes = [self.layers[i].shape for i in self.weighted]
        ends = np.cumsum([math.prod(s) for s in shapes]).tolist()
        self.layer_bounds = list(zip([0] + ends[:-1], ends))  # each layer's span of the flat buffers
        flat = lambda arrays: xp.concatenate([xp.asarray(a).ravel() for a in arrays])  # noqa: E731 - a device copy
        self.w_flat = flat(weights)
        self.weights = _views(self.w_flat, shapes)
        self.g_flat = xp.empty_like(self.w_flat)
        self.grads = _views(self.g_flat, shapes)
        self.scores = self.masks = None
        self.granular = cfg.score_granularity != "weight" and scores is not None  # a score covers several weights
        self.score_bounds = self.layer_bounds
        self.sg_flat, self.score_grads = self.g_flat, self.grads  # the learned tensor's gradient
        if scores is not None:
            self.s_flat = flat(scores)
            self.scores = _views(self.s_flat, [s.shape for s in scores])
            self.m_flat = xp.empty(self.w_flat.shape, dtype=bool)
            self.masks = _views(self.m_flat, shapes)
            self.we_flat = xp.empty_like(self.w_flat)
            self.w_eff = _views(self.we_flat, shapes)
            self.tmp = xp.empty_like(self.w_flat)
            self.u_flat, self.u_tmp = self.m_flat, self.tmp  # the masks of the scores' units, and their scratch
        if self.granular:
            ends = np.cumsum([s.size for s in self.scores]).tolist()
            self.score_bounds = list(zip([0] + ends[:-1], ends))
            self.u_flat, self.u_tmp = xp.empty(self.s_flat.shape, dtype=bool), xp.empty_like(self.s_flat)
            self.unit_masks = _views(self.u_flat, [s.shape for s in self.scores])
            self.sg_flat = xp.empty_like(self.s_flat)
            self.score_grads = _views(self.sg_flat, [s.shape for s in self.scores])
        # fresh random weights of weight layer i, for the methods that redraw some (IteRand)
        self.draw = lambda rng, i: draw_weights(rng, cfg, self.layers[self.weighted[i]])
        self.method = METHODS[cfg.method](self, cfg)

    @property
    def params(self) -> list:
        """What the optimizer updates: one flat tensor (its gradient: sg_flat)."""
        return [self.s_flat if self.method.learns == "scores" else self.w_flat]

    def expand_masks(self) -> None:
        """The weights' masks from their units' (score_granularity kernel or filter)."""
        for m, u in zip(self.masks, self.unit_masks):
            m[...] = u

    def sum_units(self, values) -> None:
        """sg_flat = the sum of weight-shaped `values` (flat) over each score's weights."""
        for (lo, hi), m, g in zip(self.layer_bounds, self.masks, self.score_grads):
            v = values[lo:hi].reshape(m.shape)
            v.sum(axis=tuple(i for i, n in enumerate(g.shape) if n == 1 and m.shape[i] != 1), keepdims=True, out=g)

    def reseed(self, seed: int, epoch: int) -> None:
        """The method's random stream for an epoch (supermask's samples): a function of (seed,
        epoch) only, so a resumed run draws the same."""
        self.method.reseed(self, seed, epoch)

    def set_k(self, k: float) -> None:
        """The fraction of weights kept from now on (the k warm-up's epochs)."""
        self.method.set_k(k)

    def effective_weights(self, train: bool = True) -> list:
        """W_eff per layer (views of one buffer); the masks are kept in self.masks."""
        return self.method.effective_weights(self, train)

    def subnetwork(self, masks: list) -> list:
        """W_eff for given masks (a stored run's), instead of the scores' own."""
        for buf, m in zip(self.masks, masks):
            buf[...] = self.xp.asarray(m)
        return self.method.combine(self)

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
        """The optimizer's step on `params`, from backward's dL/dW_eff, as the method makes it (on
        the CPU, edge-popup's is one fused loop that also begins the next top-k: read the masks
        and W_eff after effective_weights())."""
        self.method.update(self, opt, lr)

    def learned_gradient(self) -> list:
        """dL/dW_eff (backward's) -> dL/d(learned tensor): the gradients of `params` (sg_flat)."""
        self.method.gradient(self)
        return [self.sg_flat]


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
