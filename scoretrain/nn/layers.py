"""The layers of a score network: linear, conv, ReLU, BatchNorm, pooling, flatten and residual
blocks, each one object with its forward and backward pass. Every weight layer computes with the
effective weights W_eff it is given and writes dL/dW_eff: how those are made from the frozen
random weights and what is learned is the method's (methods.py); the layers never know which.
model.py builds architectures from them.

All array code is written against `xp` (numpy or cupy).
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels import conv_engine
from ..kernels.backend import fused


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
    computed by the conv engine in use (kernels/conv_engine.py, train.conv_engine). The reference
    engine, im2col, is this class's own code: one GEMM over im2col patches. The input's gradient
    is, at stride 1, the convolution of the output's gradient with the kernel flipped (one more
    GEMM over patches, which the CPU copies faster than it scatters them back), where those
    patches are no larger than the input's; else col2im."""

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

    def patches(self, x, stride: int, pad: int):
        """im2col: [n * ho * wo, k * k * c], row (b, y, x) the k x k x c patch that output reads."""
        xp, k = self.xp, self.k
        n, h, w, c = x.shape
        ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        loops = fused(xp, x) if xp is np else None
        if loops:  # numba: copied from x in one pass, the same values
            cols = np.empty((n * ho * wo, k * k * c), x.dtype)
            loops.im2col(x, stride, pad, cols.reshape(n, ho, wo, k, k, c))
            return cols
        if pad:
            padded = xp.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=x.dtype)
            padded[:, pad : pad + h, pad : pad + w] = x
        else:
            padded = xp.ascontiguousarray(x)
        # a strided view [n, ho, wo, k, k, c] of the padded input; the reshape copies it once
        sn, sh, sw, sc = padded.strides
        cols = xp.lib.stride_tricks.as_strided(padded, (n, ho, wo, k, k, c), (sn, sh * stride, sw * stride, sh, sw, sc))
        return cols.reshape(n * ho * wo, k * k * c)

    def forward(self, x, w_eff, train):
        engine = conv_engine.current()
        y, kept = engine.forward(self, x, w_eff[self.index])
        return y, (engine, kept)

    def backward(self, d, cache, w_eff, grads, need_dx):
        engine, kept = cache  # the forward's engine: the two passes of a step run on one
        return engine.backward(self, d, kept, w_eff[self.index], grads[self.index], need_dx)

    def im2col_forward(self, x, w):
        cols = self.patches(x, self.stride, self.pad)
        y = cols @ w.reshape(len(w), -1).T
        return y.reshape(*x.shape[:1], *self._out(*x.shape[1:3]), len(w)), (cols, x.shape)

    def im2col_backward(self, d, cache, w, dw, need_dx):
        xp, k, p, st = self.xp, self.k, self.pad, self.stride
        cols, (n, h, wd, c) = cache
        ho, wo = d.shape[1:3]
        d2 = d.reshape(-1, len(w))
        xp.matmul(d2.T, cols, out=dw.reshape(len(w), -1))
        if not need_dx:
            return None
        if st == 1 and p < k and len(w) <= c:  # dx = d convolved with the flipped kernel: patches [.., k, k, out] @ [k, k, out, in]
            flipped = w[:, ::-1, ::-1, :].transpose(1, 2, 0, 3).reshape(-1, c)  # (a copy)
            return (self.patches(d, 1, k - 1 - p) @ flipped).reshape(n, h, wd, c)
        dcols = (d2 @ w.reshape(len(w), -1)).reshape(n, ho, wo, k, k, c)
        loops = fused(xp, dcols)
        if loops:  # the same sums as the loop below, in one pass (numba; a CUDA kernel)
            dx = xp.empty((n, h, wd, c), dtype=d.dtype)
            loops.col2im(dcols, st, p, dx)
            return dx
        dx = xp.zeros((n, h + 2 * p, wd + 2 * p, c), dtype=d.dtype)
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

    def forward(self, x, w_eff, train, relu: bool = False, add=None):
        """`relu`: with the ReLU that follows (np.maximum(y, 0)) in the same pass, and in the
        backward pass its gradient too. `add`: with a residual block's sum (y + add) before that
        ReLU, whose gradient the block takes itself (it needs the sum's output)."""
        xp, c, span = self.xp, self.c, self.sum_span()
        loops = fused(xp, x, *([] if add is None else [add])) if xp is np else None  # numba: the same float32 and float64 operations
        if train:
            mean, var = self.batch_statistics(x, span, loops)
            n, m = x.size // c, self.momentum
            self.mean *= 1 - m
            self.mean += (m * mean).astype(self.mean.dtype)
            self.var *= 1 - m
            self.var += (m * n / max(n - 1, 1) * var).astype(self.var.dtype)
        else:
            mean, var = self.mean.astype(x.dtype), self.var.astype(x.dtype)
        inv = 1 / xp.sqrt(var + x.dtype.type(self.eps))
        gamma, beta = self._affine(x.dtype)
        if loops:
            y = xp.empty_like(x)
            loops.normalize(x.reshape(-1), c, wide_span(c), mean, inv, gamma, beta, None if add is None else add.reshape(-1),
                            True if relu else None, y.reshape(-1))
        else:
            y = (x - mean) * inv
            if self.affine:
                y *= gamma
                y += beta
            if add is not None:
                y += add
            if relu:
                xp.maximum(y, 0, out=y)
        return y, (x, mean, inv, train, relu and add is None, span)

    def _affine(self, dtype):
        """gamma and beta in the data's dtype, (None, None) without `affine`."""
        return (self.gamma.astype(dtype), self.beta.astype(dtype)) if self.affine else (None, None)

    def sum_span(self) -> int:
        """How the channel sums run (kernels/loops.py), as the conv engine in use says (its
        bn_sums): over spans of one row, each channel's sum in row order (`rows`: im2col, the
        reference's bits), or of whole rows of at least SPAN_VALUES values (`spans`: span / c
        interleaved partial sums per channel, added at the end; they vectorize at 8 channels)."""
        return self.c if conv_engine.current().bn_sums == "rows" else wide_span(self.c)

    def channel_sum(self, a, span: int):
        """The float64 sum per channel of `a` (channels last), in the order of the loops' sums
        over spans of `span` values (a last partial span as if padded with zeros)."""
        flat = a.reshape(-1)
        if flat.size % span:
            flat = self.xp.concatenate([flat, self.xp.zeros(span - flat.size % span, flat.dtype)])
        return flat.reshape(-1, span).sum(axis=0, dtype=np.float64).reshape(-1, self.c).sum(axis=0)

    def batch_statistics(self, x, span: int, loops=None):
        """The batch's mean and biased variance per channel, in x's dtype. Each is a sum of
        N x H x W terms (100,352 for MNIST at batch 128): float32 sums of that many lose 1e-2 of
        the gradient, so every one of BatchNorm's channel sums is accumulated in float64
        (channel_sum). The variance is the mean square of x - mean (no cancellation of
        E[x^2] - E[x]^2)."""
        c, n = self.c, x.size // self.c
        if loops:
            sums = np.zeros((1, c))
            loops.channel_sums(x.reshape(-1), c, span, None, sums)
            mean = (sums[0] / n).astype(x.dtype)
            sums[...] = 0
            loops.channel_sums(x.reshape(-1), c, span, mean, sums)
            return mean, (sums[0] / n).astype(x.dtype)
        mean = (self.channel_sum(x, span) / n).astype(x.dtype)
        centered = x.reshape(-1, c) - mean
        centered *= centered
        return mean, (self.channel_sum(centered, span) / n).astype(x.dtype)

    def backward(self, d, cache, w_eff, grads, need_dx):
        x, mean, inv, train, relu, span = cache  # x: its input (a ReLU after it works in place on its output)
        c, n = self.c, d.size // self.c
        loops = fused(self.xp, d, x) if self.xp is np and train else None
        if loops:  # numba: the four sums in one pass, then dx in one more; the array code's bits
            return self._backward_fused(loops, d, x, mean, inv, n, relu, span)
        xhat = (x - mean) * inv
        if relu:  # the ReLU's backward (d * (y > 0)), y its input as the forward computed it
            gamma, beta = self._affine(d.dtype)
            d = d * ((xhat * gamma + beta if self.affine else xhat) > 0)
        rows, xhat = d.reshape(-1, c), xhat.reshape(-1, c)
        channel_sum = lambda a: self.channel_sum(a, span).astype(d.dtype)  # noqa: E731
        if self.affine:
            self.dgamma[...] = channel_sum(rows * xhat)
            self.dbeta[...] = channel_sum(rows)
            rows = rows * self.gamma.astype(d.dtype)
        if not train:
            return (rows * inv).reshape(d.shape)
        return ((rows - channel_sum(rows) / n - xhat * (channel_sum(rows * xhat) / n)) * inv).reshape(d.shape)

    def _backward_fused(self, loops, d, x, mean, inv, n, relu, span):
        gamma, beta = self._affine(d.dtype)
        relu, c = True if relu else None, self.c
        sums = np.zeros((4, c))
        loops.normalize_backward_sums(d.reshape(-1), x.reshape(-1), c, span, mean, inv, gamma, beta, relu, sums)
        if self.affine:
            self.dgamma[...], self.dbeta[...] = sums[2].astype(d.dtype), sums[3].astype(d.dtype)
        a, b = sums[0].astype(d.dtype) / n, sums[1].astype(d.dtype) / n
        dx = np.empty_like(d)
        loops.normalize_backward(d.reshape(-1), x.reshape(-1), c, wide_span(c), mean, inv, gamma, beta, relu, a, b, dx.reshape(-1))
        return dx


SPAN_VALUES = 64


def wide_span(c: int) -> int:
    """The whole rows of c channels that hold at least SPAN_VALUES values: BatchNorm's elementwise
    passes run over such spans (and its sums, where the engine takes `spans`)."""
    return c * max(1, -(-SPAN_VALUES // c))


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
    """size x size max pooling, stride size (a last partial row/column is dropped, as in PyTorch)."""

    def __init__(self, xp, size: int = 2):
        self.xp, self.size = xp, size

    def output_shape(self, shape: tuple) -> tuple[tuple, int]:
        h, w, c = shape
        return (h // self.size, w // self.size, c), 0

    def describe(self) -> dict:
        return {"type": "maxpool", "size": self.size, "stride": self.size}

    def _corners(self, x):
        """The size * size strided views x[:, a::size, b::size] of each window, in row-major order."""
        s = self.size
        hs, ws = x.shape[1] // s, x.shape[2] // s
        return [x[:, a : s * hs : s, b : s * ws : s] for a in range(s) for b in range(s)]

    def forward(self, x, w_eff, train, relu: bool = False):
        """`relu`: with the ReLU before it (np.maximum(x, 0)) in the same pass, and in the backward
        pass its gradient too (Network)."""
        loops = fused(self.xp, x) if self.xp is np else None
        if loops:  # numba: the same maxima in one pass
            n, h, w, ch = x.shape
            y = np.empty((n, h // self.size, w // self.size, ch), x.dtype)
            loops.maxpool(x, self.size, True if relu else None, y)
            return y, (x, y, relu)
        if relu:
            x = self.xp.maximum(x, 0, out=x)  # as ReLU.forward
        c = self._corners(x)
        if len(c) == 4:
            y = self.xp.maximum(self.xp.maximum(c[0], c[1]), self.xp.maximum(c[2], c[3]))
        else:
            y = c[0]
            for corner in c[1:]:
                y = self.xp.maximum(y, corner)
        return y, (x, y, relu)

    def backward(self, d, cache, w_eff, grads, need_dx):
        xp = self.xp
        x, y, relu = cache  # with relu, on the numba path x is the ReLU's input, else its output
        loops = fused(xp, d, x, y) if xp is np else None
        if loops:  # numba: the same gradients in one pass
            covered = x.shape[1] == self.size * y.shape[1] and x.shape[2] == self.size * y.shape[2]
            dx = np.empty(x.shape, d.dtype) if covered else np.zeros(x.shape, d.dtype)
            loops.maxpool_backward(d, x, y, self.size, True if relu else None, dx)
            return dx
        dx = xp.zeros(x.shape, dtype=d.dtype)
        taken = xp.zeros(y.shape, dtype=bool)
        for corner, dcorner in zip(self._corners(x), self._corners(dx)):
            hit = corner == y  # the gradient goes to the first maximum of each window only
            hit &= ~taken
            taken |= hit
            dcorner[...] = d * hit
        return dx * (x > 0) if relu else dx  # as ReLU.backward


class AvgPool2d(MaxPool2d):
    """size x size average pooling, stride size (a last partial row/column is dropped)."""

    def describe(self) -> dict:
        return {"type": "avgpool", "size": self.size, "stride": self.size}

    def forward(self, x, w_eff, train):
        corners = self._corners(x)
        y = corners[0].copy()
        for corner in corners[1:]:
            y += corner
        y *= 1.0 / len(corners)
        return y, x.shape

    def backward(self, d, shape, w_eff, grads, need_dx):
        dx = self.xp.zeros(shape, dtype=d.dtype)
        share = d * (1.0 / self.size**2)
        for dcorner in self._corners(dx):
            dcorner[...] = share
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
        # Fused, with the bits of the layers one by one: a BatchNorm and the ReLU after it in one
        # pass (forward_all), and the last BatchNorm, the sum and its ReLU in another.
        s, short = forward_all(self.shortcut, x, w_eff, train)
        last = self.main[-1]
        if isinstance(last, BatchNorm) and own_code(last) and own_code(self.relu):
            y, main = forward_all(self.main[:-1], x, w_eff, train)
            y, c = last.forward(y, w_eff, train, relu=True, add=s)
            return y, (main + [c], short, y)
        y, main = forward_all(self.main, x, w_eff, train)
        if own_code(self.relu):  # (a main path without BatchNorm)
            loops = fused(self.xp, y, s) if self.xp is np else None
            if loops:
                loops.add_relu(y.reshape(-1), s.reshape(-1), y.reshape(-1))  # over the main path's output: no layer keeps it
            else:
                self.xp.add(y, s, out=y)
                self.xp.maximum(y, 0, out=y)
        else:
            y, _ = self.relu.forward(y + s, w_eff, train)
        return y, (main, short, y)

    def backward(self, d, cache, w_eff, grads, need_dx):
        main, short, out = cache
        d = self.relu.backward(d, out, w_eff, grads, need_dx)
        dm = backward_all(self.main, main, d, w_eff, grads)
        ds = backward_all(self.shortcut, short, d, w_eff, grads)
        return self.xp.add(dm, ds, out=dm)  # into the first conv's own dx: dm + ds, without a new array


def relu_runner(layers: list, i: int) -> int | None:
    """Where layers[i], a ReLU, runs inside a neighbour's pass, forward and backward, with the
    bits of the two one by one: the index of the BatchNorm before it, or else of the max pool
    after it (their `relu`); None where it runs itself. Only layers running their own code
    (own_code) are fused."""
    if not isinstance(layers[i], ReLU) or not own_code(layers[i]):
        return None
    if i and isinstance(layers[i - 1], BatchNorm) and own_code(layers[i - 1]):
        return i - 1
    if i + 1 < len(layers) and type(layers[i + 1]) is MaxPool2d and own_code(layers[i + 1]):
        return i + 1
    return None


def forward_all(layers: list, x, w_eff, train):
    """The forward pass of a sequence of layers, a ReLU run by its neighbour where relu_runner
    says so (its cache None): the output and each layer's cache."""
    caches, last = [], len(layers) - 1
    for i, layer in enumerate(layers):
        if relu_runner(layers, i) is not None:
            caches.append(None)
            continue
        runs_relu = (i < last and relu_runner(layers, i + 1) == i) or (i > 0 and relu_runner(layers, i - 1) == i)
        x, cache = layer.forward(x, w_eff, train, relu=True) if runs_relu else layer.forward(x, w_eff, train)
        caches.append(cache)
    return x, caches


def backward_all(layers: list, caches: list, d, w_eff, grads, first: int = 0, first_dx: bool = True):
    """The backward pass of forward_all's layers from `first` on (dx of layers[first] only with
    `first_dx`): the input's gradient."""
    for i in reversed(range(first, len(layers))):
        if relu_runner(layers, i) is None:  # (else its neighbour took the gradient through it)
            d = layers[i].backward(d, caches[i], w_eff, grads, need_dx=first_dx or i > first)
    return d


def own_code(layer) -> bool:
    """Whether a layer's forward is its class's (or a wrapper that allows fusing it, `fusable`), not
    one given to the object (a test's instrumentation): only those are fused with their neighbours."""
    f = vars(layer).get("forward")
    return f is None or getattr(f, "fusable", False)


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
