"""Fused loops: the passes over every weight in a training step (the top-k threshold, the mask
and W_eff, the straight-through gradient, the optimizer update), each as one loop. As NumPy or
CuPy array code each is several passes (kernels) with temporaries, over arrays larger than
the caches; these read every input once.

On the CPU they are numba loops; on the GPU the straight-through gradient and the optimizer
updates are CUDA kernels (the end of this file), and the top-k stays array code (one device
partition). backend.fused hands them out, for contiguous float32 arrays; float64 (the gradient
checks) takes the array code. Each loop gives the same bits as the array code it replaces, as
written in its docstring: tests/test_model.py checks the numba loops against it, and
tests/test_gpu.py the CUDA kernels against the numba loops. numba does not check bounds: every
loop runs over its first array's size, and the others must be as long. numba takes ~0.4 s to
import, so this module is imported on first use; the compiled loops are cached on disk
(cache=True), so only a machine's first run compiles them.
"""

import functools
import types

import numba
import numpy as np

BLOCK = 32  # band_topk counts a block in a vectorized loop before it looks at single values

# The top-k works on the bits of |x| (x's bits without the sign bit) as unsigned integers, which
# for floats >= 0 order like the values: t is a threshold in those bits. The loops keep to 32-bit
# integers (numba would widen them to 64 bits), so that they vectorize. Where `w` and `out` are
# given, out = w * mask is written in the same pass (None: only the mask).
MAGNITUDE = np.uint32(0x7FFFFFFF)
SIGN = np.uint32(0x80000000)


@numba.njit(cache=True)
def band_topk(x, k, lo, hi, mask, w, out, band_idx):
    """The top-k mask of |x| in one pass over x, if the k-th largest lies in the band [lo, hi]
    (lo <= hi): returns (True, t). Otherwise (False, 0), and mask and out hold garbage.

    The pass keeps the values above the band, drops those below it, and notes the indices of
    those in it (blocks without one, most of them for a narrow band, are only counted); then
    only the band is partitioned, and its values are kept or dropped by the threshold found,
    ties at it to the lowest indices."""
    bits = x.view(np.uint32)
    width = np.uint32(hi - lo)  # b in [lo, hi]  <=>  b - lo <= width, in wrapping arithmetic
    above, found = 0, 0
    whole = bits.size - bits.size % BLOCK
    for start in range(0, whole, BLOCK):
        block_above, block_in = 0, 0
        for i in range(start, start + BLOCK):  # a constant trip count, no branch: vectorized
            v = bits[i] & MAGNITUDE
            keep = v > hi
            mask[i] = keep
            if out is not None:  # decided when numba compiles, not per value
                out[i] = w[i] * keep
            block_above += np.int32(keep)
            block_in += np.int32(np.uint32(v - lo) <= width)
        above += block_above
        if block_in:
            for i in range(start, start + BLOCK):
                if np.uint32((bits[i] & MAGNITUDE) - lo) <= width:
                    band_idx[found] = i
                    found += 1
    for i in range(whole, bits.size):  # the last, partial block
        v = bits[i] & MAGNITUDE
        mask[i] = v > hi
        if out is not None:
            out[i] = w[i] * mask[i]
        above += v > hi
        if np.uint32(v - lo) <= width:
            band_idx[found] = i
            found += 1
    if not above < k <= above + found:
        return False, np.uint32(0)
    idx = band_idx[:found]
    values = bits[idx] & MAGNITUDE
    t = np.partition(values, found - (k - above))[found - (k - above)]
    ties = k - above - np.count_nonzero(values > t)  # how many of the values equal to t to keep
    for j in range(found):  # in index order
        keep = values[j] > t or (values[j] == t and ties > 0)
        ties -= values[j] == t and keep
        mask[idx[j]] = keep
        if out is not None:
            out[idx[j]] = w[idx[j]] * keep
    return True, t


@numba.njit(cache=True)
def keep_top(x, t, ties, mask, w, out):
    """The mask of |x| > t, plus the first `ties` indices where |x| == t."""
    bits = x.view(np.uint32)
    for i in range(bits.size):  # branch-free: vectorized
        keep = (bits[i] & MAGNITUDE) > t
        mask[i] = keep
        if out is not None:
            out[i] = w[i] * keep
    for i in range(bits.size if ties > 0 else 0):
        if (bits[i] & MAGNITUDE) == t:
            mask[i] = True
            if out is not None:
                out[i] = w[i]
            ties -= 1
            if ties == 0:
                break


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


# --- the same updates as CUDA kernels, for CuPy -------------------------------------------------
# The bodies do what the numba loops above do, with __f*_rn intrinsics: they round after every
# operation, as the array code does (CUDA would otherwise fuse a multiply and an add into one FMA),
# so that a GPU step gives the CPU's bits. Parameters: (inputs, outputs, body), as
# cupy.ElementwiseKernel takes them; an output is read and written in place.
CUDA = {
    "straight_through": (
        "float32 w, float32 s", "float32 g",
        "float v = __fmul_rn(g, w); g = signbit(s) ? -v : v;",
    ),
    "sgd": (
        "float32 g, float32 lr, float32 mu, float32 wd, bool nesterov", "float32 p, float32 buf",
        """float d = g;
        if (wd != 0.0f) d = __fadd_rn(d, __fmul_rn(p, wd));
        if (mu != 0.0f) {
            float b = __fadd_rn(__fmul_rn(buf, mu), d);
            buf = b;
            d = nesterov ? __fadd_rn(d, __fmul_rn(b, mu)) : b;
        }
        p = __fsub_rn(p, __fmul_rn(d, lr));""",
    ),
    "adam": (
        "float32 g, float32 step_size, float32 b1, float32 one_minus_b1, float32 b2, "
        "float32 one_minus_b2, float32 c2, float32 eps, float32 wd", "float32 p, float32 m, float32 v",
        """float d = g;
        if (wd != 0.0f) d = __fadd_rn(d, __fmul_rn(p, wd));
        float mi = __fadd_rn(__fmul_rn(m, b1), __fmul_rn(d, one_minus_b1));
        float vi = __fadd_rn(__fmul_rn(v, b2), __fmul_rn(__fmul_rn(d, d), one_minus_b2));
        m = mi;
        v = vi;
        p = __fsub_rn(p, __fmul_rn(__fdiv_rn(mi, __fadd_rn(__fsqrt_rn(__fdiv_rn(vi, c2)), eps)), step_size));""",
    ),
}


@functools.cache
def cuda():
    """The CUDA kernels, compiled by CuPy on first use, called like the numba loops."""
    import cupy

    k = {name: cupy.ElementwiseKernel(*spec, name=f"scoretrain_{name}") for name, spec in CUDA.items()}
    return types.SimpleNamespace(
        straight_through=lambda g, w, s: k["straight_through"](w, s, g),
        sgd=lambda p, g, buf, lr, mu, wd, nesterov: k["sgd"](g, lr, mu, wd, nesterov, p, buf),
        adam=lambda p, g, m, v, *scalars: k["adam"](g, *scalars, p, m, v),
    )
