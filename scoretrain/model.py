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

from .backend import fused
from .config import ModelConfig
from .methods import METHODS

RELU_GAIN = math.sqrt(2.0)


# --- layers -----------------------------------------------------------------------------------
# Every layer: forward(x, w_eff, train) -> (y, cache) and backward(d, cache, w_eff, grads, need_dx)
# -> dx. A weight layer computes with w_eff[self.index] and writes dL/dW_eff into grads[self.index]
# (build_layers numbers them in forward order); `train` is the training pass (BatchNorm's batch
# statistics) or the measuring one. A block is a layer made of layers (its `children`). Every
# layer says its output shape (output_shape) and describes itself for `export` (describe).
# Images are channels-last, [N, H, W, C]; conv weights are [out, kh, kw, in].


class Linear:
    kind = "linear"

    def __init__(self, xp, n_in: int, n_out: int):
        self.xp, self.shape, self.fan_in, self.index = xp, (n_out, n_in), n_in, None

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        """The output's per-sample shape for an input's, and how many more values per sample the
        layer keeps for its backward pass (the im2col patches of a conv)."""
        return (self.shape[0],), 0

    def describe(self) -> dict:
        """What export writes of the layer: x @ W.T, no bias."""
        return {"type": "linear", "weight": f"weight_{self.index:02d}", "shape": list(self.shape)}

    def forward(self, x, w_eff, train):
        return x @ w_eff[self.index].T, x

    def backward(self, d, x, w_eff, grads, need_dx):
        self.xp.matmul(d.T, x, out=grads[self.index])
        return d @ w_eff[self.index] if need_dx else None


class Conv2d:
    """A k x k convolution with a stride, zero padding (k // 2 by default: 'same' at stride 1),
    as one GEMM over im2col patches."""

    kind = "conv"

    def __init__(self, xp, c_in: int, c_out: int, k: int, stride: int = 1, pad: int | None = None):
        self.xp, self.shape, self.fan_in, self.index = xp, (c_out, k, k, c_in), c_in * k * k, None
        self.k, self.stride, self.pad = k, stride, k // 2 if pad is None else pad

    def _out(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.k, self.stride, self.pad
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        h, w, c = shape
        ho, wo = self._out(h, w)
        return (ho, wo, self.shape[0]), ho * wo * self.k * self.k * c

    def describe(self) -> dict:
        same = self.stride == 1 and self.pad == self.k // 2
        return {"type": "conv", "weight": f"weight_{self.index:02d}", "shape": list(self.shape),
                "padding": "same" if same else self.pad, "stride": self.stride}

    def forward(self, x, w_eff, train):
        xp, k, p, st, w = self.xp, self.k, self.pad, self.stride, w_eff[self.index]
        n, h, wd, c = x.shape
        ho, wo = self._out(h, wd)
        if p:
            padded = xp.zeros((n, h + 2 * p, wd + 2 * p, c), dtype=x.dtype)
            padded[:, p : p + h, p : p + wd] = x
        else:
            padded = xp.ascontiguousarray(x)
        # im2col as a strided view [n, ho, wo, k, k, c] of the padded input; the reshape copies it once
        sn, sh, sw, sc = padded.strides
        cols = xp.lib.stride_tricks.as_strided(padded, (n, ho, wo, k, k, c), (sn, sh * st, sw * st, sh, sw, sc))
        cols = cols.reshape(n * ho * wo, k * k * c)
        y = cols @ w.reshape(len(w), -1).T
        return y.reshape(n, ho, wo, len(w)), (cols, x.shape)

    def backward(self, d, cache, w_eff, grads, need_dx):
        xp, k, p, st, w = self.xp, self.k, self.pad, self.stride, w_eff[self.index]
        cols, (n, h, wd, c) = cache
        ho, wo = d.shape[1:3]
        d2 = d.reshape(-1, len(w))
        xp.matmul(d2.T, cols, out=grads[self.index].reshape(len(w), -1))
        if not need_dx:
            return None
        dcols = (d2 @ w.reshape(len(w), -1)).reshape(n, ho, wo, k, k, c)
        dx = xp.zeros((n, h + 2 * p, wd + 2 * p, c), dtype=d.dtype)
        loops = fused(xp, dcols, dx)
        if loops:  # the same sums as the loop below, in one pass (numba; a CUDA kernel)
            loops.col2im(dcols, st, dx)
            return dx[:, p : p + h, p : p + wd]
        for i in range(k):  # col2im: each patch adds its gradient back where it was read
            for j in range(k):
                dx[:, i : i + st * (ho - 1) + 1 : st, j : j + st * (wo - 1) + 1 : st] += dcols[:, :, :, i, j]
        return dx[:, p : p + h, p : p + wd]


class ReLU:
    def __init__(self, xp):
        self.xp = xp

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        return shape, 0

    def describe(self) -> dict:
        return {"type": "relu"}

    def forward(self, x, w_eff, train):
        y = self.xp.maximum(x, 0, out=x)  # in place: x is always the previous layer's own output
        return y, y

    def backward(self, d, y, w_eff, grads, need_dx):
        loops = fused(self.xp, d, y)
        if loops:  # one pass (numba; a CUDA kernel), the same bits
            out = self.xp.empty_like(d)
            loops.relu_backward(d.reshape(-1), y.reshape(-1), out.reshape(-1))
            return out
        return d * (y > 0)


class BatchNorm:
    """Batch normalization over the channels (the last axis): (x - mean) / sqrt(var + eps), then
    with `affine` a learned scale and shift per channel, gamma * x + beta (biprop's "learned BN";
    model.bn: affine), else none (the score methods' default, model.bn: nonaffine). Training
    uses the batch's mean and (biased) variance and moves the running statistics by `momentum`
    towards them (the unbiased variance, as PyTorch); measuring uses the running statistics.
    run.h5 stores both, and gamma and beta. The Network owns gamma and beta (views of its flat
    bn_flat, which the optimizer updates with the learned tensor) and their gradients."""

    kind = "batchnorm"

    def __init__(self, xp, c: int, affine: bool = False, momentum: float = 0.1, eps: float = 1e-5):
        self.xp, self.c, self.affine, self.momentum, self.eps = xp, c, affine, momentum, eps
        self.mean, self.var = xp.zeros(c, np.float32), xp.ones(c, np.float32)
        self.gamma = self.beta = self.dgamma = self.dbeta = None  # affine: set by the Network

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        return shape, math.prod(shape)  # it keeps its input for the backward pass

    def describe(self) -> dict:
        return {"type": "batchnorm", "affine": self.affine, "eps": self.eps, "state": f"batchnorm_{self.number:02d}"}

    def forward(self, x, w_eff, train):
        xp, axes = self.xp, tuple(range(x.ndim - 1))
        if train:
            mean, var = self.batch_statistics(x)
            n, m = x.size // self.c, self.momentum
            self.mean *= 1 - m
            self.mean += (m * mean).astype(self.mean.dtype)
            self.var *= 1 - m
            self.var += (m * n / max(n - 1, 1) * var).astype(self.var.dtype)
        else:
            mean, var = self.mean.astype(x.dtype), self.var.astype(x.dtype)
        inv = 1 / xp.sqrt(var + x.dtype.type(self.eps))
        y = (x - mean) * inv
        if self.affine:
            y *= self.gamma.astype(x.dtype)
            y += self.beta.astype(x.dtype)
        return y, (x, mean, inv, train)

    def batch_statistics(self, x):
        """The batch's mean and biased variance per channel, in x's dtype. Each is a sum of
        N x H x W terms (100,352 for MNIST at batch 128): float32 sums of that many lose 1e-2 of
        the gradient (issue 20), so every one of BatchNorm's channel sums is accumulated in
        float64. The variance is the mean square of x - mean (no cancellation of E[x^2] - E[x]^2)."""
        axes, n = tuple(range(x.ndim - 1)), x.size // self.c
        mean = (x.sum(axis=axes, dtype=np.float64) / n).astype(x.dtype)
        centered = x - mean
        centered *= centered
        return mean, (centered.sum(axis=axes, dtype=np.float64) / n).astype(x.dtype)

    def backward(self, d, cache, w_eff, grads, need_dx):
        x, mean, inv, train = cache  # its input, not its output: a ReLU after it works in place on that
        axes, n = tuple(range(d.ndim - 1)), d.size // self.c
        xhat = (x - mean) * inv
        channel_sum = lambda a: a.sum(axis=axes, dtype=np.float64).astype(d.dtype)  # noqa: E731 - as batch_statistics
        if self.affine:
            self.dgamma[...] = channel_sum(d * xhat)
            self.dbeta[...] = channel_sum(d)
            d = d * self.gamma.astype(d.dtype)
        if not train:
            return d * inv
        return (d - channel_sum(d) / n - xhat * (channel_sum(d * xhat) / n)) * inv


class GlobalAvgPool:
    """The mean over each channel's positions: [N, H, W, C] -> [N, C]."""

    def __init__(self, xp):
        self.xp = xp

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        return (shape[-1],), 0

    def describe(self) -> dict:
        return {"type": "global_avg_pool"}

    def forward(self, x, w_eff, train):
        return x.mean(axis=(1, 2)), x.shape

    def backward(self, d, shape, w_eff, grads, need_dx):
        n, h, w, c = shape
        return self.xp.broadcast_to((d / (h * w))[:, None, None, :], shape)


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

    def forward(self, x, w_eff, train):
        c = self._corners(x)
        y = self.xp.maximum(self.xp.maximum(c[0], c[1]), self.xp.maximum(c[2], c[3]))
        return y, (x, y)

    def backward(self, d, cache, w_eff, grads, need_dx):
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

    def forward(self, x, w_eff, train):
        return x.reshape(len(x), -1), x.shape

    def backward(self, d, shape, w_eff, grads, need_dx):
        return d.reshape(shape)


class ResidualBlock:
    """He et al.'s basic block: relu(main(x) + shortcut(x)), main = conv3x3 (stride) [BN] ReLU
    conv3x3 [BN], shortcut = x, or a projection, conv1x1 (stride) [BN], where the shape changes."""

    kind = "block"

    def __init__(self, xp, c_in: int, c_out: int, stride: int, bn: str):
        self.xp = xp
        self.main = [Conv2d(xp, c_in, c_out, 3, stride), *norm(xp, c_out, bn), ReLU(xp), Conv2d(xp, c_out, c_out, 3), *norm(xp, c_out, bn)]
        project = stride != 1 or c_in != c_out
        self.shortcut = [Conv2d(xp, c_in, c_out, 1, stride, pad=0), *norm(xp, c_out, bn)] if project else []
        self.children = self.main + self.shortcut
        self.relu = ReLU(xp)  # of the sum

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        kept, ends = 0, []  # every inner layer's output and extras live until the backward pass
        for path in (self.main, self.shortcut):
            s = shape
            for layer in path:
                s, extra = layer.output_shape(s)
                kept += math.prod(s) + extra
            ends.append(s)
        return ends[0], kept

    def describe(self) -> dict:
        return {"type": "residual", "main": [l.describe() for l in self.main],
                "shortcut": [l.describe() for l in self.shortcut] or "identity"}

    def forward(self, x, w_eff, train):
        y, s = x, x
        main, short = [], []
        for layer in self.main:
            y, c = layer.forward(y, w_eff, train)
            main.append(c)
        for layer in self.shortcut:
            s, c = layer.forward(s, w_eff, train)
            short.append(c)
        out, _ = self.relu.forward(y + s, w_eff, train)
        return out, (main, short, out)

    def backward(self, d, cache, w_eff, grads, need_dx):
        main, short, out = cache
        d = self.relu.backward(d, out, w_eff, grads, need_dx)
        dm, ds = d, d
        for layer, c in zip(reversed(self.main), reversed(main)):
            dm = layer.backward(dm, c, w_eff, grads, True)
        for layer, c in zip(reversed(self.shortcut), reversed(short)):
            ds = layer.backward(ds, c, w_eff, grads, True)
        return dm + ds


def norm(xp, c: int, bn: str) -> list:
    """The normalization after a conv: model.bn."""
    return [] if bn == "none" else [BatchNorm(xp, c, affine=bn == "affine")]


def walk(layers: list):
    """Every layer, blocks' children included, in forward order."""
    for layer in layers:
        yield layer
        yield from walk(getattr(layer, "children", []))


def weight_layers(layers: list) -> list:
    return [l for l in walk(layers) if hasattr(l, "shape")]


def norm_layers(layers: list) -> list:
    return [l for l in walk(layers) if isinstance(l, BatchNorm)]


# The VGG-like nets of the lottery-ticket and edge-popup papers (3x3 convs, 'M' = 2x2 max
# pool, then fully connected layers), and a LeNet-style net (5x5 convs) for MNIST.
ARCHS = {
    "conv2": (3, [64, 64, "M"], [256, 256]),
    "conv4": (3, [64, 64, "M", 128, 128, "M"], [256, 256]),
    "conv6": (3, [64, 64, "M", 128, 128, "M", 256, 256, "M"], [256, 256]),
    "conv8": (3, [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"], [256, 256]),
    "lenet": (5, [32, "M", 64, "M"], [512]),
}
# Residual nets: (stem channels, channels per stage, blocks per stage, whether model.width scales
# the stem). The CIFAR ResNets of He et al. (6n + 2 layers, 16-32-64 channels), the CIFAR
# ResNet-18 (hidden-networks' cResNet18), and a wide ResNet of depth 28 (Zagoruyko & Komodakis:
# 4 blocks per stage of 16k-32k-64k channels, k = model.width; a stem of 16 whatever k).
RESNETS = {
    "resnet20": (16, [16, 32, 64], 3, True),
    "resnet32": (16, [16, 32, 64], 5, True),
    "resnet56": (16, [16, 32, 64], 9, True),
    "resnet18": (64, [64, 128, 256, 512], 2, True),
    "wrn28": (16, [16, 32, 64], 4, False),
}


def build_layers(xp, cfg: ModelConfig, image_shape: tuple[int, int, int], n_classes: int) -> list:
    """The layer list of `cfg.arch` for [N, H, W, C] inputs. `mlp` takes its widths from
    cfg.widths; the conv and residual nets scale every channel count and hidden width by
    cfg.width. The weight layers are numbered in forward order, BatchNorms likewise."""
    h, w, c = image_shape
    scale = lambda n: max(1, int(round(n * cfg.width)))  # noqa: E731
    layers = []
    if cfg.arch in RESNETS:
        stem, stages, blocks, wide_stem = RESNETS[cfg.arch]
        stem = scale(stem) if wide_stem else stem
        layers += [Conv2d(xp, c, stem, 3), *norm(xp, stem, cfg.bn), ReLU(xp)]
        c = stem
        for i, width in enumerate(stages):
            for j in range(blocks):
                layers.append(ResidualBlock(xp, c, scale(width), 2 if i > 0 and j == 0 else 1, cfg.bn))
                c = scale(width)
        layers += [GlobalAvgPool(xp), Linear(xp, c, n_classes)]
        return _numbered(layers)
    if cfg.arch == "mlp":
        widths = cfg.widths
    else:
        k, convs, fcs = ARCHS[cfg.arch]
        for item in convs:
            if item == "M":
                layers.append(MaxPool2d(xp))
                h, w = h // 2, w // 2
            else:
                layers += [Conv2d(xp, c, scale(item), k), *norm(xp, scale(item), cfg.bn), ReLU(xp)]
                c = scale(item)
        widths = [h * w * c] + [scale(n) for n in fcs] + [n_classes]
    layers.append(Flatten())
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(Linear(xp, n_in, n_out))
        if i < len(widths) - 2:
            layers.append(ReLU(xp))
    return _numbered(layers)


def _numbered(layers: list) -> list:
    for i, layer in enumerate(weight_layers(layers)):
        layer.index = i
    for i, layer in enumerate(norm_layers(layers)):
        layer.number = i
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
    weighted = weight_layers(build_layers(np, cfg, image_shape, n_classes))
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
                 image_shape=(28, 28, 1), n_classes: int = 10, norms: list | None = None):
        self.xp = xp
        self.layers = build_layers(xp, cfg, image_shape, n_classes)
        self.weight_layers = weight_layers(self.layers)
        # backward stops at the first top-level layer holding weights: nothing before it learns
        self.first = next(i for i, l in enumerate(self.layers) if weight_layers([l]))
        self.norms = norm_layers(self.layers)
        # the affine BatchNorms' gamma and beta: one flat buffer (gamma 1, beta 0 at the start),
        # learned with the method's tensor, and its gradient
        affine = [n for n in self.norms if n.affine]
        self.bn_flat = self.bn_grad = None
        if affine:
            self.bn_flat = xp.concatenate([xp.concatenate([xp.ones(n.c, np.float32), xp.zeros(n.c, np.float32)]) for n in affine])
            self.bn_grad = xp.zeros_like(self.bn_flat)
            at = 0
            for n in affine:
                n.gamma, n.beta = self.bn_flat[at : at + n.c], self.bn_flat[at + n.c : at + 2 * n.c]
                n.dgamma, n.dbeta = self.bn_grad[at : at + n.c], self.bn_grad[at + n.c : at + 2 * n.c]
                at += 2 * n.c
        if norms is not None:  # a stored run's running statistics (and gamma, beta)
            self.set_norm_state(norms)
        shapes = [l.shape for l in self.weight_layers]
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
        self.draw = lambda rng, i: draw_weights(rng, cfg, self.weight_layers[i])
        self.method = METHODS[cfg.method](self, cfg)

    @property
    def params(self) -> list:
        """What the optimizer updates: one flat tensor (its gradient: sg_flat), and the affine
        BatchNorms' gamma and beta (bn_flat; gradient bn_grad) where there are any."""
        learned = [self.s_flat if self.method.learns == "scores" else self.w_flat]
        return learned + ([self.bn_flat] if self.bn_flat is not None else [])

    @property
    def param_grads(self) -> list:
        """The gradients of `params`, once backward and the method's gradient have run."""
        return [self.sg_flat] + ([self.bn_grad] if self.bn_grad is not None else [])

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

    def norm_state(self) -> list:
        """Each BatchNorm's state, on the device: [mean, var] stacked ([2, C]), affine ones
        [mean, var, gamma, beta] ([4, C])."""
        return [self.xp.stack([n.mean, n.var] + ([n.gamma, n.beta] if n.affine else [])) for n in self.norms]

    def set_norm_state(self, states: list) -> None:
        for n, s in zip(self.norms, states, strict=True):
            if len(s) != (4 if n.affine else 2):
                raise ValueError(f"BatchNorm state of {len(s)} rows for a {'affine' if n.affine else 'non-affine'} layer")
            n.mean[...], n.var[...] = self.xp.asarray(s[0]), self.xp.asarray(s[1])
            if n.affine:
                n.gamma[...], n.beta[...] = self.xp.asarray(s[2]), self.xp.asarray(s[3])

    def recalibrate(self, w_eff: list, batches) -> None:
        """Each BatchNorm's running statistics recomputed under `w_eff` as the plain average of
        the batch statistics of `batches` (training-mode passes, as PyTorch's update_bn), in
        place of the moving averages: those lag behind a mask that moves at every step, and the
        error compounds through a residual net's BatchNorms."""
        saved = [n.momentum for n in self.norms]
        for n in self.norms:
            n.mean[...], n.var[...] = 0, 0
        for i, x in enumerate(batches):
            for n in self.norms:  # momentum 1/(i+1): the cumulative average of the batches so far
                n.momentum = 1 / (i + 1)
            self.forward(x, w_eff, train=True)
        for n, m in zip(self.norms, saved):
            n.momentum = m

    def forward(self, x, w_eff: list, train: bool = True):
        """Logits, and what each layer keeps for the backward pass. `train`: the training pass
        (BatchNorm normalizes by the batch and moves its running statistics), else measuring."""
        caches = []
        for layer in self.layers:
            x, cache = layer.forward(x, w_eff, train)
            caches.append(cache)
        return x, caches

    def backward(self, caches: list, w_eff: list, dlogits) -> None:
        """dL/dW_eff, from dL/dlogits, into self.grads (views of self.g_flat)."""
        d = dlogits
        for i in reversed(range(self.first, len(self.layers))):
            d = self.layers[i].backward(d, caches[i], w_eff, self.grads, need_dx=i > self.first)

    def update(self, opt, lr: float) -> None:
        """The optimizer's step on `params`, from backward's dL/dW_eff, as the method makes it (on
        the CPU, edge-popup's is one fused loop that also begins the next top-k: read the masks
        and W_eff after effective_weights())."""
        self.method.update(self, opt, lr)

    def learned_gradient(self) -> list:
        """dL/dW_eff (backward's) -> dL/d(learned tensor): the gradients of `params` (sg_flat)."""
        self.method.gradient(self)
        return self.param_grads


def cross_entropy(xp, logits, y, grad: bool = True):
    """Summed loss, number correct (both 0-d device arrays) and dL/dlogits of the *mean* loss.
    On a GPU one CUDA kernel (kernels.cu) does it all, where the array code below is ~14."""
    loops = fused(xp, logits) if xp is not np and y.dtype == np.int64 and y.flags.c_contiguous else None
    if loops:  # (the labels as the kernel reads them: contiguous int64)
        loss, correct = xp.empty((), logits.dtype), xp.empty((), xp.int64)
        dlogits = xp.empty_like(logits) if grad else None
        loops.cross_entropy(logits, y, dlogits, loss, correct)
        return loss, correct, dlogits
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
