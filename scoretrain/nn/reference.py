"""Edge-popup on one screen (Ramanujan et al. 2020), as plain array code: the specification that
the fast paths (nn/methods.py topk_mask and straight_through, kernels/loops.py, kernels/radix_select.py)
must match bit for bit, and are tested against (tests/test_reference.py, tests/test_model.py).

    M     = top-k(|S|)      the kept_count(k, n) = max(1, min(n, round(k n))) largest |S|,
                            ties to the lowest flat index (a stable descending sort)
    W_eff = W * M           forward
    dL/dS = dL/dW_eff * W * sign(S)
                            backward, straight through the mask (as if M were |S|; hidden-networks'
                            GetSubnet passes g through unchanged, then autograd through |S|)

sign(S) is S's sign bit: +1 for +0.0, -1 for -0.0. Arrays are NumPy or CuPy (`xp` follows them).
"""

import sys

import numpy as np

from .methods import kept_count


def _xp(a):
    cupy = sys.modules.get("cupy")  # never imported here: only where the package already runs on it
    return cupy.get_array_module(a) if cupy else np


def keep_largest(scores, count: int):
    """A bool mask of scores' shape, True at the `count` largest |scores|, ties to the lowest index."""
    xp = _xp(scores)
    order = xp.argsort(-xp.abs(scores.ravel()), kind="stable")
    mask = xp.zeros(scores.size, dtype=bool)
    mask[order[:count]] = True
    return mask.reshape(scores.shape)


def topk_mask(scores, k: float):
    """The mask that keeps the fraction k of the weights: kept_count(k, n) of them, by |score|."""
    return keep_largest(scores, kept_count(k, scores.size))


def forward(w, scores, k: float):
    """W_eff = W * M."""
    return w * topk_mask(scores, k)


def backward(grad_w_eff, w, scores=None):
    """The straight-through gradient, the mask passed through: dL/d|S| = dL/dW_eff * W; with
    `scores`, dL/dS = dL/dW_eff * W * sign(S) (S's sign bit, so exactly g * w or -(g * w))."""
    g = grad_w_eff * w
    if scores is None:
        return g
    xp = _xp(g)
    return xp.where(xp.signbit(scores), -g, g)
