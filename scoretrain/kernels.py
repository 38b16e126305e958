"""Fused loops for the CPU (numba): the passes over every weight in a training step (the
top-k threshold, the mask and W_eff, the straight-through gradient, the optimizer update),
each as one loop. NumPy makes each of them several passes with temporaries, over arrays larger
than the caches; these loops read every input once.

model.py and optim.py call them on the NumPy backend, for the arrays backend.fused accepts
(1-D contiguous float32; float64, used by the gradient checks, takes the array code); on CuPy
the array code runs, one kernel per op on the device. Each loop gives the same bits as the
array code it replaces, as written in its docstring; tests/test_model.py checks that. numba
does not check bounds: every loop runs over its first array's size, the others must be as long.
numba takes ~0.4 s to import, so this module is imported on first use (backend.cpu_kernels);
the compiled loops are cached on disk (cache=True), so only a machine's first run compiles them.
"""

import numba
import numpy as np

BLOCK = 32  # band_scan counts a block in a vectorized loop before it looks at single values

# The selection works on the bits of |x| (x's bits without the sign bit) as unsigned integers,
# which for floats >= 0 order like the values. Every loop keeps to 32-bit integers (numba would
# widen them to 64 bits), so that it vectorizes.
MAGNITUDE = np.uint32(0x7FFFFFFF)
SIGN = np.uint32(0x80000000)


@numba.njit(cache=True)
def band_scan(x, lo, hi, band):
    """With b = the magnitude bits of x, and lo <= hi: returns count(b > hi) and the number of
    b in [lo, hi], which are copied to `band` (in order). Blocks without such a value, most of
    them for a narrow band, are only counted."""
    bits = x.view(np.uint32)
    width = np.uint32(hi - lo)  # b in [lo, hi]  <=>  b - lo <= width, in wrapping arithmetic
    above, found = 0, 0
    whole = bits.size - bits.size % BLOCK
    for start in range(0, whole, BLOCK):
        block_above, block_in = 0, 0
        for i in range(start, start + BLOCK):  # a fixed trip count and no branch: vectorized
            v = bits[i] & MAGNITUDE
            block_above += np.int32(v > hi)
            block_in += np.int32(np.uint32(v - lo) <= width)
        above += block_above
        if block_in:
            for i in range(start, start + BLOCK):
                v = bits[i] & MAGNITUDE
                if np.uint32(v - lo) <= width:
                    band[found] = v
                    found += 1
    for i in range(whole, bits.size):  # the last, partial block
        v = bits[i] & MAGNITUDE
        above += v > hi
        if np.uint32(v - lo) <= width:
            band[found] = v
            found += 1
    return above, found


@numba.njit(cache=True)
def at_least(x, t, mask):
    """mask = |x| >= the float whose bits are t."""
    bits = x.view(np.uint32)
    for i in range(bits.size):
        mask[i] = (bits[i] & MAGNITUDE) >= t


@numba.njit(cache=True)
def keep_top(x, t, w, mask, out):
    """at_least(x, t, mask), and out = w * mask, in one pass."""
    bits = x.view(np.uint32)
    for i in range(bits.size):
        m = (bits[i] & MAGNITUDE) >= t
        mask[i] = m
        out[i] = w[i] * m


@numba.njit(cache=True)
def masked(w, mask, out):
    """out = w * mask"""
    for i in range(w.size):
        out[i] = w[i] * mask[i]


@numba.njit(cache=True)
def straight_through(g, w, s):
    """g *= w * sign(s), with s's sign bit for its sign: g * w, negated where s's sign bit is
    set (model.times_sign's convention: where s == +0 the product is kept)."""
    s_bits = s.view(np.uint32)
    for i in range(g.size):
        v = g[i] * w[i]
        g[i] = -v if s_bits[i] & SIGN else v


# The optimizers' updates (optim.py's array code, in its order of operations and its float32
# roundings: every scalar comes in as a float32).


@numba.njit(cache=True)
def sgd(p, g, buf, lr, mu, wd, nesterov):
    """optim.SGD.step on one tensor: g += wd * p; buf = mu * buf + g; p -= lr * (g + mu * buf
    if nesterov else buf). Without momentum (mu == 0), buf is untouched and p -= lr * g."""
    for i in range(p.size):
        d = g[i]
        if wd:
            d += p[i] * wd
        if mu:
            b = buf[i] * mu + d
            buf[i] = b
            d = d + b * mu if nesterov else b
        p[i] -= d * lr


@numba.njit(cache=True)
def adam(p, g, m, v, step_size, b1, one_minus_b1, b2, one_minus_b2, c2, eps, wd):
    """optim.Adam.step on one tensor: g += wd * p; m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g; p -= step_size * m / (sqrt(v / c2) + eps)."""
    for i in range(p.size):
        d = g[i]
        if wd:
            d += p[i] * wd
        mi = m[i] * b1 + d * one_minus_b1
        vi = v[i] * b2 + d * d * one_minus_b2
        m[i], v[i] = mi, vi
        p[i] -= mi / (np.sqrt(vi / c2) + eps) * step_size
