"""The GPU's sort-free top-k (radix_select.py, kernels.cu): its CPU model against a stable sort,
on random and tie-heavy scores, for groups of every size around a block's; tests/test_gpu.py
runs the CUDA kernels against the model where there is a GPU."""

import numpy as np
import pytest

from scoretrain.nn.methods import topk_mask
from scoretrain.kernels.radix_select import CHUNK, MODEL, RadixTopK


def stable_topk(x, k):
    """The first k of a stable descending sort of |x|'s bits (NaN first, -0.0 == +0.0)."""
    key = (x.view(np.uint32) & np.uint32(0x7FFFFFFF)).astype(np.int64)
    mask = np.zeros(x.size, bool)
    mask[np.argsort(-key, kind="stable")[:k]] = True
    return mask


SIZES = [1, 5, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17]


def scores(kind, n, rng):
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ties":  # a handful of values, signed zeros among them: most of the top-k is decided by index
        return rng.choice(np.array([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0], np.float32), n)
    if kind == "equal":
        return np.full(n, -0.25, np.float32)
    if kind == "special":  # inf, nan, subnormals, the largest finite
        x = rng.standard_normal(n).astype(np.float32) * np.float32(1e-40)
        special = np.array([np.inf, -np.inf, np.nan, 3.4e38, -1e-45, 0.0, 1.0], np.float32)
        at = rng.choice(n, min(n, 7), replace=False)
        x[at] = special[: len(at)]
        return x
    raise ValueError(kind)


def problem(kind):
    """(groups, x, w, rng): one group of each of SIZES, its scores of `kind`, weights."""
    rng = np.random.default_rng(len(kind))
    groups, at = [], 0
    for n in SIZES:
        groups.append((at, at + n))
        at += n
    x = np.concatenate([scores(kind, n, rng) for n in SIZES])
    return groups, x, rng.standard_normal(x.size).astype(np.float32), rng


@pytest.mark.parametrize("kind", ["normal", "ties", "equal", "special"])
def test_the_model_keeps_the_first_k_of_a_stable_sort_in_every_group(kind):
    groups, x, w, _ = problem(kind)
    topk = RadixTopK(np, groups)
    for fractions in ([1.0] * len(SIZES), [0.5] * len(SIZES), [0.01, 0.3, 0.7, 0.999, 0.1, 0.6]):
        kept = [max(1, min(hi - lo, round(f * (hi - lo)))) for f, (lo, hi) in zip(fractions, groups)]
        kept[-1] = max(1, kept[-1] - 1)  # n - 1 too
        topk.set_kept(kept)
        mask, w_out = np.zeros(x.size, bool), np.full(x.size, 7.0, np.float32)
        topk.select(x, mask, w, w_out)
        for (lo, hi), k in zip(groups, kept):
            want = stable_topk(x[lo:hi], k)
            np.testing.assert_array_equal(mask[lo:hi], want)
            bits = x[lo:hi].view(np.uint32) & np.uint32(0x7FFFFFFF)
            assert topk.thresholds().view(np.uint32)[groups.index((lo, hi))] == np.sort(bits)[::-1][k - 1]
        np.testing.assert_array_equal(w_out.view(np.uint32), (w * mask).view(np.uint32))  # -0.0 where a negative w is dropped
        again = np.zeros(x.size, bool)
        topk.select(x, again)  # the buffers are ready for the next step (the histogram was cleared)
        np.testing.assert_array_equal(again, mask)


def test_it_equals_the_cpu_top_k_on_training_like_scores():
    rng = np.random.default_rng(3)
    x = (rng.uniform(-1, 1, 250 * 784) * np.float32(0.05)).astype(np.float32)
    for k in (1, 9800, 98000, 195999):
        want, _ = topk_mask(np, x, k)
        topk = RadixTopK(np, [(0, x.size)])
        topk.set_kept([k])
        got = np.zeros(x.size, bool)
        topk.select(x, got)
        np.testing.assert_array_equal(got, want)
        assert got.sum() == k


def test_the_model_has_a_function_for_every_cuda_kernel_of_the_top_k():
    import re
    from pathlib import Path

    import scoretrain

    source = (Path(scoretrain.__file__).parent / "kernels" / "kernels.cu").read_text()
    kernels = re.findall(r"__global__ void (topk_\w+)\(", source)
    assert kernels == ["topk_histogram", "topk_pick", "topk_count_ties", "topk_scan_ties", "topk_mask"]
    assert all(callable(getattr(MODEL, name)) for name in kernels)
