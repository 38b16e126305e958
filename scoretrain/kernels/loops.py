"""Fused loops: the passes over every weight in a training step (the straight-through gradient,
the optimizer update, the top-k threshold, the mask and W_eff), as few loops as possible. As
NumPy or CuPy array code each is several passes (kernels) with temporaries, over arrays larger
than the caches; these read every input once.

On the CPU they are numba loops, and for edge-popup one loop does a whole step's work on the
scores: `score_step` takes dL/dW_eff through the mask, updates each score with the optimizer's rule,
and sorts the new score against a band around the last threshold (above it, below it, or in
it). What remains of the next top-k is a partition of the few values in the band (`settle`).
On the GPU the straight-through gradient, the optimizer updates and the top-k (a radix select,
radix_select.py) are CUDA kernels, kernels.cu, loaded at the end of this file. backend.fused hands them
out, for contiguous float32 arrays; float64 (the gradient checks) takes the array code.

Each loop gives the same bits as the array code it replaces, as written in its docstring:
tests/test_model.py checks the numba loops against it, and tests/test_cuda_executor.py the CUDA
kernels against the numba loops, kernels.cu compiled for and run on the CPU (tests/test_gpu.py
does the same on a GPU). numba does not check bounds: every loop runs over its first array's
size (score_step over its band's spans, settle over its indices), and the others must be as long. numba takes ~0.4 s to import, so this module is imported
on first use; the compiled loops are cached on disk (cache=True), so only a machine's first run
compiles them.
"""

import functools
import math
import types
from collections import namedtuple
from pathlib import Path

import numba
import numpy as np

# The top-k ranks by |x|. score_step compares float magnitudes, where `not |x| <= hi` is also true
# for NaN, which ranks above everything, as it does in the bits of |x| (x's bits without the
# sign bit) as unsigned integers, which order like the values for floats >= 0, and in which the
# partitions work and a threshold t is given.
MAGNITUDE = np.uint32(0x7FFFFFFF)
BLOCK = np.uint64(32)  # score_step counts a block in a vectorized loop before it looks at single values

# error_model="numpy": a float division by zero gives inf, as in NumPy, unchecked (numba's default
# raises ZeroDivisionError, and its check keeps a loop from vectorizing).
jit = numba.njit(cache=True, error_model="numpy")

# What score_step sorts against: per span [spans[j, 0], spans[j, 1]) of x, the band of
# magnitudes bounds[j] = (lo, hi). It writes mask = |x| > hi, and notes the indices (relative to
# the span) of the values in the band in index[spans[j, 0]:], and (above, found) in counts[j].
Band = namedtuple("Band", "spans bounds mask index counts")


# --- one element ---------------------------------------------------------------------------------
# numba inlines these into the loops that call them. They take and return values, never arrays:
# an array passed to an inlined function is reference-counted at every call, and the loop would
# not vectorize. The optimizer rules are optim.py's array code, in its order of operations and
# its float32 roundings (every scalar comes in as a float32).


@numba.njit(inline="always")
def _sgd(x, d, b, lr, mu, wd, nesterov):
    """g += wd * p; buf = mu * buf + g; p -= lr * (g + mu * buf if nesterov else buf), for
    x = p[i], d = g[i], b = buf[i]: the new (x, b). Without momentum (mu == 0) b is kept and
    p -= lr * g."""
    if wd:
        d += x * wd
    if mu:
        b = b * mu + d
        d = d + b * mu if nesterov else b
    return x - d * lr, b


@numba.njit(inline="always")
def _adam(x, d, m, v, step_size, b1, one_minus_b1, b2, one_minus_b2, c2, eps, wd):
    """g += wd * p; m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g;
    p -= step_size * m / (sqrt(v / c2) + eps), for x = p[i], d = g[i], m[i], v[i]: the new
    (x, m, v)."""
    if wd:
        d += x * wd
    m = m * b1 + d * one_minus_b1
    v = v * b2 + d * d * one_minus_b2
    return x - m / (np.sqrt(v / c2) + eps) * step_size, m, v


@numba.njit(inline="always")
def _through(g, w, s):
    """g * w * sign(s), with s's sign bit for its sign: negated where the bit is set (where
    s == +0 the product is kept: the straight-through derivative of |s| at 0 is a convention).
    The straight-through gradient of W_eff = w * |s|."""
    v = g * w
    return -v if math.copysign(1.0, s) < 0 else v


# --- the loops ------------------------------------------------------------------------------------


@jit
def sgd(p, g, opt):
    """optim.SGD's update of p with gradient g; opt = (buf, lr, mu, wd, nesterov)."""
    buf, lr, mu, wd, nesterov = opt
    for i in range(p.size):
        p[i], buf[i] = _sgd(p[i], g[i], buf[i], lr, mu, wd, nesterov)


@jit
def adam(p, g, opt):
    """optim.Adam's update of p with gradient g; opt = (m, v, step_size, b1, 1 - b1, b2, 1 - b2,
    c2, eps, wd)."""
    m, v, step_size, b1, one_minus_b1, b2, one_minus_b2, c2, eps, wd = opt
    for i in range(p.size):
        p[i], m[i], v[i] = _adam(p[i], g[i], m[i], v[i], step_size, b1, one_minus_b1, b2, one_minus_b2, c2, eps, wd)


@jit
def straight_through(g, w, s):
    """g *= w * sign(s), s's sign bit for its sign (model.times_sign's convention)."""
    for i in range(g.size):
        g[i] = _through(g[i], w[i], s[i])


@jit
def score_step(p, g, sgd, adam, w, band, out):
    """Edge-popup's step on the scores p, in one pass: each p[i] is updated by the optimizer
    rule given (sgd or adam, as in the loops above) with the straight-through gradient of
    W_eff = w * |p| from g = dL/dW_eff, then sorted against its span's band (see Band); with
    `out`, out = w * mask is written too. With no rule (and no g), the top-k pass alone.
    numba compiles the branches of the arguments given only: one that is None prunes them.

    Indices are unsigned: numba would otherwise guard every access against a negative index
    (Python's wrap-around), and the loop would not vectorize."""
    mask, index, one = band.mask, band.index, np.uint64(1)
    if sgd is not None:
        buf, lr, mu, wd, nesterov = sgd
    if adam is not None:
        m, v, step_size, b1, one_minus_b1, b2, one_minus_b2, c2, eps, wd = adam
    for j in range(len(band.spans)):
        a, b = np.uint64(band.spans[j, 0]), np.uint64(band.spans[j, 1])
        lo, hi = band.bounds[j, 0], band.bounds[j, 1]
        above, found = 0, np.uint64(0)
        whole = b - (b - a) % BLOCK
        for start in range(a, whole, BLOCK):
            block_above, block_in = np.int32(0), np.int32(0)
            for i in range(start, start + BLOCK):  # a constant trip count, no branch: vectorized
                x = p[i]
                if sgd is not None:
                    x, buf[i] = _sgd(x, _through(g[i], w[i], x), buf[i], lr, mu, wd, nesterov)
                    p[i] = x
                if adam is not None:
                    x, m[i], v[i] = _adam(x, _through(g[i], w[i], x), m[i], v[i], step_size, b1, one_minus_b1, b2, one_minus_b2, c2, eps, wd)
                    p[i] = x
                kept = not abs(x) <= hi
                mask[i] = kept
                if out is not None:
                    out[i] = w[i] * kept
                block_above += np.int32(kept)
                block_in += np.int32((lo <= abs(x)) & (abs(x) <= hi))  # & as no branch
            above += block_above
            if block_in:  # few blocks for a narrow band
                for i in range(start, start + BLOCK):
                    if lo <= abs(p[i]) <= hi:
                        index[a + found] = i - a
                        found += one
        # The last, partial block: the same, one by one. (One loop for both would not vectorize,
        # with its trip count not a constant; and a helper for the body could not prune the
        # branches on None, which numba does only in the jitted function itself.)
        for i in range(whole, b):
            x = p[i]
            if sgd is not None:
                x, buf[i] = _sgd(x, _through(g[i], w[i], x), buf[i], lr, mu, wd, nesterov)
                p[i] = x
            if adam is not None:
                x, m[i], v[i] = _adam(x, _through(g[i], w[i], x), m[i], v[i], step_size, b1, one_minus_b1, b2, one_minus_b2, c2, eps, wd)
                p[i] = x
            kept = not abs(x) <= hi
            mask[i] = kept
            if out is not None:
                out[i] = w[i] * kept
            above += kept
            if lo <= abs(x) <= hi:
                index[a + found] = i - a
                found += one
        band.counts[j, 0], band.counts[j, 1] = above, found


@jit
def settle(x, k, above, index, mask, w, out):
    """Finish a top-k that score_step began, given that the k-th largest |x| is in the band
    (above < k <= above + len(index)): keep the k - above largest of the band's values x[index],
    ties at the threshold to the lowest indices; returns the threshold t (bits of |x|)."""
    bits = x.view(np.uint32)
    found = len(index)
    values = bits[index] & MAGNITUDE
    t = np.partition(values, found - (k - above))[found - (k - above)]
    ties = k - above - np.count_nonzero(values > t)  # how many of the values equal to t to keep
    for j in range(found):  # in index order
        kept = values[j] > t or (values[j] == t and ties > 0)
        ties -= values[j] == t and kept
        mask[index[j]] = kept
        if out is not None:
            out[index[j]] = w[index[j]] * kept
    return t


@jit
def keep_top(x, t, ties, mask, w, out):
    """The mask of |x| > t, plus the first `ties` indices where |x| == t (and out = w * mask)."""
    bits = x.view(np.uint32)
    for i in range(bits.size):  # branch-free: vectorized
        kept = (bits[i] & MAGNITUDE) > t
        mask[i] = kept
        if out is not None:
            out[i] = w[i] * kept
    for i in range(bits.size if ties > 0 else 0):
        if (bits[i] & MAGNITUDE) == t:
            mask[i] = True
            if out is not None:
                out[i] = w[i]
            ties -= 1
            if ties == 0:
                break


@jit
def masked(w, mask, out):
    """out = w * mask"""
    for i in range(w.size):
        out[i] = w[i] * mask[i]


@jit
def relu_backward(d, y, out):
    """out = d * (y > 0)"""
    for i in range(d.size):
        out[i] = d[i] * (y[i] > 0)


@numba.njit(inline="always")
def _relu(y):
    """np.maximum(y, 0)'s value (NumPy's bits: -0.0 gives +0.0, NaN stays NaN)."""
    return y if y > 0 or y != y else np.float32(0)


@numba.njit(inline="always")
def _maximum(a, b):
    """np.maximum(a, b)'s value: NaN where either is NaN, and b where a == b (so +0.0 or -0.0 as b)."""
    return a if a > b or a != a else b


@jit
def maxpool(x, size, relu, out):
    """out[b, i, j] = the maximum of x's size x size window at (size * i, size * j): MaxPool2d's
    np.maximum over the window's corners in row-major order, pairwise at size 2 ((c0, c1) and
    (c2, c3), then the two), one after another at other sizes. With relu (True; None: not) of
    np.maximum(x, 0), the ReLU before the pool. The same bits, in one pass. Flat unsigned indices
    (as im2col), a channel run at a time."""
    n, h, w, c = x.shape
    ho, wo = out.shape[1], out.shape[2]
    xf, yf, cu = x.reshape(-1), out.reshape(-1), np.uint64(c)
    row, col = np.uint64(w * c), cu  # x's strides (elements) along h and w
    o = np.uint64(0)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                at = np.uint64(((b * h + size * i) * w + size * j) * c)  # the window's first corner
                if size == 2:
                    for ch in range(cu):
                        c0, c1, c2, c3 = xf[at + ch], xf[at + col + ch], xf[at + row + ch], xf[at + row + col + ch]
                        if relu is not None:
                            c0, c1, c2, c3 = _relu(c0), _relu(c1), _relu(c2), _relu(c3)
                        yf[o + ch] = _maximum(_maximum(c0, c1), _maximum(c2, c3))
                else:
                    for a in range(size):
                        for e in range(size):
                            corner = at + np.uint64(a) * row + np.uint64(e) * col
                            for ch in range(cu):
                                v = xf[corner + ch] if relu is None else _relu(xf[corner + ch])
                                yf[o + ch] = v if a == 0 and e == 0 else _maximum(yf[o + ch], v)
                o += cu


@jit
def maxpool_backward(d, x, y, size, relu, dx):
    """dx[window] = d where x first equals its maximum y (row-major), d * 0.0 elsewhere in the
    window: MaxPool2d.backward's d * hit over the corners, in one pass; with relu (True; None:
    not), x is the ReLU's input, its output np.maximum(x, 0) is what the pool saw, and each dx is
    then times (x > 0), the ReLU's backward. What no window covers (a last partial row or column)
    is left as dx has it (zeros). A hit is 1.0 or 0.0, and `left` 1.0 until a window's first: no
    branches in the loop over the channels."""
    n, h, w, c = x.shape
    ho, wo = d.shape[1], d.shape[2]
    xf, yf, df, dxf, cu = x.reshape(-1), y.reshape(-1), d.reshape(-1), dx.reshape(-1), np.uint64(c)
    row, col = np.uint64(w * c), cu
    left = np.empty(c, np.float32)
    o = np.uint64(0)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                at = np.uint64(((b * h + size * i) * w + size * j) * c)
                left[:] = 1
                for a in range(size):
                    for e in range(size):
                        corner = at + np.uint64(a) * row + np.uint64(e) * col
                        for ch in range(cu):
                            v = xf[corner + ch] if relu is None else _relu(xf[corner + ch])
                            hit = np.float32(v == yf[o + ch]) * left[ch]
                            left[ch] -= hit
                            g = df[o + ch] * hit
                            dxf[corner + ch] = g if relu is None else g * np.float32(v > 0)
                o += cu


@numba.njit(inline="always")
def _tap(b, ty, tx, i, j, stride, pad, h, w, c):
    """The flat offset in [n, h, w, c] images of the pixel that tap (i, j) of output (b, ty, tx)
    reads, -1 where that is the padding."""
    r, q = ty * stride + i - pad, tx * stride + j - pad
    return ((b * h + r) * w + q) * c if 0 <= r < h and 0 <= q < w else -1


@jit
def im2col(x, stride, pad, cols):
    """cols[b, y, x, i, j, :] = x[b, stride * y + i - pad, stride * x + j - pad, :], zero where that
    is outside x: Conv2d.forward's patches, copied from x where the array code first pads a copy.
    Flat indices (unsigned: no negative-index checks), a channel run at a time."""
    n, h, w, c = x.shape
    _, ho, wo, k, _, _ = cols.shape
    xf, out, cu = x.reshape(-1), cols.reshape(-1), np.uint64(c)
    for b in range(n):
        o = np.uint64(b * ho * wo * k * k * c)
        for ty in range(ho):
            for tx in range(wo):
                for i in range(k):
                    for j in range(k):
                        at = _tap(b, ty, tx, i, j, stride, pad, h, w, c)
                        if at >= 0:
                            for ch in range(cu):
                                out[o + ch] = xf[np.uint64(at) + ch]
                        else:
                            for ch in range(cu):
                                out[o + ch] = 0
                        o += cu


@jit
def col2im(dcols, stride, pad, dx):
    """dx[b, stride * y + i - pad, stride * x + j - pad, :] += dcols[b, y, x, i, j, :] over every
    patch, into zeros (inside dx; what lands in the padding is dropped): Conv2d's col2im. Each
    element of dx sums its patches' gradients in the order of the array code, (i, j) ascending:
    the patches are visited from the last, and one that is later in (y, x) touches an element at
    a smaller (i, j). The same bits."""
    n, ho, wo, k, _, c = dcols.shape
    h, w = dx.shape[1], dx.shape[2]
    src, out, cu = dcols.reshape(-1), dx.reshape(-1), np.uint64(c)
    for b in range(n):
        image = np.uint64(b * h * w * c)
        for e in range(np.uint64(h * w * c)):
            out[image + e] = 0
        for ty in range(ho - 1, -1, -1):
            for tx in range(wo - 1, -1, -1):
                o = np.uint64((((b * ho + ty) * wo + tx) * k * k) * c)
                for i in range(k):
                    for j in range(k):
                        at = _tap(b, ty, tx, i, j, stride, pad, h, w, c)
                        if at >= 0:
                            for ch in range(cu):
                                out[np.uint64(at) + ch] += src[o + ch]
                        o += cu


# BatchNorm's passes over [m, c] (flat, channels last), a span of whole rows at a time: `span`
# values, c of them (one row) or more. The per-channel values are repeated across the span
# (`_spread`), so each pass is a loop over a span, which vectorizes where a row of 8 or 16
# channels is too short a loop to. The sums are float64, one per value of the span, each summed
# over the spans in order, and a channel's are added in the order of the span at the end: with
# span = c, each channel's sum in row order, the order of the array code's
# x.reshape(-1, c).sum(0, dtype=float64); with wider spans, span / c interleaved partial sums per
# channel (BatchNorm.sum_span). Indices are unsigned (as in score_step).


@jit
def _spread(a, span):
    """a (per channel) repeated across `span` values, a whole number of rows."""
    out = np.empty(span, a.dtype)
    for j in range(span):
        out[j] = a[j % a.size]
    return out


@jit
def _spread_affine(gamma, beta, unused, span):
    """gamma and beta spread as _spread does; without gamma (None), `unused` twice, never read."""
    if gamma is None:
        return unused, unused
    return _spread(gamma, span), _spread(beta, span)


@jit
def _by_channel(lanes, c, sums):
    """sums += each channel's lanes (every c-th value of the span), in the order of the span."""
    for j in range(lanes.size):
        sums[j % c] += lanes[j]


@jit
def channel_sums(x, c, span, mean, sums):
    """BatchNorm's float64 sums per channel: with mean None, sums[0] = sum x; with mean (float32),
    sums[0] = sum (x - mean)^2, the square rounded to float32 first. sums starts at 0."""
    acc = np.zeros(span)
    if mean is not None:
        m = _spread(mean, span)
    for start in range(0, x.size, span):
        at = np.uint64(start)
        for j in range(np.uint64(min(span, x.size - start))):
            v = x[at + j]
            if mean is not None:
                v = v - m[j]
                v = v * v
            acc[j] += np.float64(v)
    _by_channel(acc, c, sums[0])


@jit
def normalize(x, c, span, mean, inv, gamma, beta, add, relu, out):
    """out = (x - mean) * inv, then with gamma and beta * gamma + beta, then with add (an array)
    + add, then with relu (True; None: not) np.maximum(out, 0): BatchNorm.forward's float32
    operations, per channel, and a residual block's sum and the ReLU after it in the same pass."""
    m, v = _spread(mean, span), _spread(inv, span)
    g, b = _spread_affine(gamma, beta, m, span)
    for start in range(0, x.size, span):
        at = np.uint64(start)
        for j in range(np.uint64(min(span, x.size - start))):
            y = (x[at + j] - m[j]) * v[j]
            if gamma is not None:
                y = y * g[j] + b[j]
            if add is not None:
                y = y + add[at + j]
            if relu is not None:
                y = _relu(y)
            out[at + j] = y


@jit
def add_relu(a, b, out):
    """out = np.maximum(a + b, 0): a residual block's sum and its ReLU in one pass."""
    for i in range(a.size):
        out[i] = _relu(a[i] + b[i])


@numba.njit(inline="always")
def _upstream(d, x, i, j, m, v, sg, sbeta, gamma, relu):
    """(g, xhat) at value i, j its place in the span: xhat = (x - mean) * inv, and g = d, with relu
    (True; None: not) taken through the ReLU after the BatchNorm first (ReLU.backward's
    d * (y > 0), from y = xhat * gamma + beta, its input, computed again); not yet times gamma."""
    xhat = (x[i] - m[j]) * v[j]
    g = d[i]
    if relu is not None:
        g = g * np.float32((xhat if gamma is None else xhat * sg[j] + sbeta[j]) > 0)
    return g, xhat


@jit
def normalize_backward_sums(d, x, c, span, mean, inv, gamma, beta, relu, sums):
    """BatchNorm.backward's float64 sums per channel in one pass, as channel_sums: sums[0] = sum
    d * gamma, sums[1] = sum d * gamma * xhat with xhat = (x - mean) * inv (gamma None: 1), and
    with gamma the affine gradients' sums, sums[2] = sum d * xhat (dgamma), sums[3] = sum d
    (dbeta). With relu (True; None: not), d is the gradient of the ReLU after the BatchNorm, taken
    through it first (ReLU.backward's d * (y > 0), y the forward's output, computed again)."""
    acc = np.zeros((4, span))
    m, v = _spread(mean, span), _spread(inv, span)
    sg, sbeta = _spread_affine(gamma, beta, m, span)
    for start in range(0, x.size, span):
        at = np.uint64(start)
        for j in range(np.uint64(min(span, x.size - start))):
            g, xhat = _upstream(d, x, at + j, j, m, v, sg, sbeta, gamma, relu)
            if gamma is not None:
                acc[2, j] += np.float64(g * xhat)
                acc[3, j] += np.float64(g)
                g = g * sg[j]
            acc[0, j] += np.float64(g)
            acc[1, j] += np.float64(g * xhat)
    for k in range(4):
        _by_channel(acc[k], c, sums[k])


@jit
def normalize_backward(d, x, c, span, mean, inv, gamma, beta, relu, a, b, out):
    """out = (d * gamma - a - xhat * b) * inv, xhat = (x - mean) * inv (gamma None: 1): the
    batch-statistics gradient of BatchNorm, with a and b its per-channel sums over n; with relu,
    d taken through the ReLU after it first, as normalize_backward_sums."""
    m, v, sa, sb = _spread(mean, span), _spread(inv, span), _spread(a, span), _spread(b, span)
    sg, sbeta = _spread_affine(gamma, beta, m, span)
    for start in range(0, x.size, span):
        at = np.uint64(start)
        for j in range(np.uint64(min(span, x.size - start))):
            g, xhat = _upstream(d, x, at + j, j, m, v, sg, sbeta, gamma, relu)
            if gamma is not None:
                g = g * sg[j]
            out[at + j] = (g - sa[j] - xhat * sb[j]) * v[j]


def update(rule, p, g, state, scalars):
    """The optimizer's update of p with gradient g, rule "sgd" or "adam"; optim.py calls it so on
    both backends (cuda().update)."""
    (sgd if rule == "sgd" else adam)(p, g, (*state, *scalars))


def score_step_with(rule, p, g, state, scalars, w, band, out):
    """score_step with the optimizer's rule "sgd" or "adam" (methods.FusedScoreStep)."""
    opt = (*state, *scalars)
    score_step(p, g, opt if rule == "sgd" else None, opt if rule == "adam" else None, w, band, out)


# --- the CUDA kernels, for CuPy -------------------------------------------------------------------
# kernels.cu: the same updates as the numba loops above (with __f*_rn intrinsics, rounding after
# every operation as the array code does), and the radix select of radix_select.py. One RawModule,
# compiled by CuPy with NVRTC on first use; tests/test_nvrtc.py compiles it as CuPy does.

CUDA_SOURCE = Path(__file__).with_name("kernels.cu")
CUDA_OPTIONS = ("--std=c++17",)  # CuPy adds its own (its headers, -ftz=true, the device's -arch)
CUDA_KERNELS = ("straight_through", "sgd", "adam", "topk_histogram", "topk_pick", "topk_count_ties",
                "topk_scan_ties", "topk_mask", "relu_backward", "col2im", "cross_entropy")
CUDA_LIBM_KERNELS = ("cross_entropy",)  # they call CUDA's expf/logf, whose code contracts (FMAs)
_THREADS = 256  # as kernels.cu's THREADS


def _grid(n: int) -> tuple[int]:
    return (max(1, min((n + _THREADS - 1) // _THREADS, 8192)),)  # grid-stride loops cover the rest


@functools.cache
def cuda(cupy):
    """The CUDA kernels, called like the numba loops (and like radix_select.MODEL's), for the
    array module `cupy`: CuPy, or in the tests a stand-in whose RawModule runs the same source on
    the CPU (tests/cuda_executor.py)."""
    module = cupy.RawModule(code=CUDA_SOURCE.read_text(), options=CUDA_OPTIONS, name_expressions=None)
    k = {name: module.get_function(name) for name in CUDA_KERNELS}
    f32, i32, i64 = np.float32, np.int32, np.int64
    block = (_THREADS,)

    def straight_through(g, w, s):
        k["straight_through"](_grid(g.size), block, (g, w, s, i64(g.size)))

    lr_buffer = cupy.empty((), f32)  # the device copy of a learning rate given as a host number

    def device_lr(lr):
        """sgd reads its learning rate on the device: a device scalar as it is (a CUDA graph's,
        step.CapturedStep), a host number written into a buffer of its own (a fill launch)."""
        if not isinstance(lr, (int, float, np.generic)):
            return lr
        lr_buffer.fill(f32(lr))
        return lr_buffer

    def update(rule, p, g, state, scalars):
        if rule == "sgd":
            scalars = (device_lr(scalars[0]), *map(f32, scalars[1:3]), i32(scalars[3]))
        else:
            scalars = tuple(map(f32, scalars))
        k[rule](_grid(p.size), block, (p, *state, g, *scalars, i64(p.size)))

    def per_block(name):  # one block per CHUNK of a group: the block table's length
        return lambda x, bounds, blk_group, *rest: k[name]((blk_group.size,), block, (x, bounds, blk_group, *rest))

    def histogram(x, bounds, blk_group, blk_start, state, hist, shift):
        per_block("topk_histogram")(x, bounds, blk_group, blk_start, state, hist, i32(shift))

    def pick(hist, state, kept, n_groups, shift):
        k["topk_pick"](((n_groups + 31) // 32,), (32,), (hist, state, kept, i32(n_groups), i32(shift)))

    def scan_ties(blk_ties, group_blocks, n_groups):
        k["topk_scan_ties"](((n_groups + 31) // 32,), (32,), (blk_ties, group_blocks, i32(n_groups)))

    def mask(x, bounds, blk_group, blk_start, state, blk_ties, m, w, w_out, with_w):
        per_block("topk_mask")(x, bounds, blk_group, blk_start, state, blk_ties, m, w, w_out, i32(with_w))

    def relu_backward(d, y, out):
        k["relu_backward"](_grid(d.size), block, (d, y, out, i64(d.size)))

    def col2im(dcols, stride, pad, dx):
        n, ho, wo, kk, _, c = dcols.shape
        k["col2im"](_grid(dx.size), block, (dcols, dx, *map(i32, (n, ho, wo, kk, c, dx.shape[1], dx.shape[2], stride, pad))))

    def cross_entropy(logits, y, dx, loss, correct):
        """dx None: no gradient (a one-element dx is passed, never written)."""
        n, c = logits.shape
        grad = dx is not None
        k["cross_entropy"]((1,), block, (logits, y, i32(n), i32(c), i32(grad), dx if grad else loss, loss, correct))

    return types.SimpleNamespace(straight_through=straight_through, update=update, topk_histogram=histogram,
                                 topk_pick=pick, topk_count_ties=per_block("topk_count_ties"),
                                 topk_scan_ties=scan_ties, topk_mask=mask, relu_backward=relu_backward,
                                 col2im=col2im, cross_entropy=cross_entropy)
