"""The GPU's exact top-k: a radix select over the bits of |x|, for every group (layer) of the flat
scores in the same few launches, with no sort, no host read and no allocation per step.

RadixTopK drives the kernels of kernels.cu. `MODEL` is the same algorithm as NumPy code, one
function per CUDA kernel with its arguments, its buffers and its steps in its order (a CUDA block
is one iteration of a loop over blocks; its threads are array code): CI runs the model against a
stable sort (tests/test_radix_select.py) and the CUDA kernels against the model on the CPU
executor (tests/test_cuda_executor.py), the GPU tests do the same on a GPU, and
tests/test_nvrtc.py compiles kernels.cu as CuPy does.

The result is methods.topk_mask's: per group exactly k values kept, those with the largest |x|,
ties at the threshold going to the lowest indices (the first k of a stable descending sort).
"""

from __future__ import annotations

import types

import numpy as np

MAGNITUDE = np.uint32(0x7FFFFFFF)
RADIX_BITS, BINS, THREADS, ITEMS = 8, 256, 256, 16  # as kernels.cu
CHUNK = THREADS * ITEMS
SHIFTS = (24, 16, 8, 0)  # one pass per 8-bit digit, from the top


# --- the CPU model of kernels.cu's top-k kernels ---------------------------------------------------


def _span(bounds, g, start):
    return int(start), int(min(start + CHUNK, bounds[2 * g + 1]))


def topk_histogram(x, bounds, blk_group, blk_start, state, hist, shift):
    for b in range(len(blk_group)):
        g = blk_group[b]
        start, end = _span(bounds, g, blk_start[b])
        high = np.uint32(0) if shift == 32 - RADIX_BITS else np.uint32((0xFFFFFFFF << (shift + RADIX_BITS)) & 0xFFFFFFFF)
        prefix = state[3 * g] & high
        key = x[start:end] & MAGNITUDE
        digits = (key[(key & high) == prefix] >> np.uint32(shift)) & np.uint32(BINS - 1)
        hist[g * BINS : (g + 1) * BINS] += np.bincount(digits, minlength=BINS).astype(np.uint32)


def topk_pick(hist, state, kept, n_groups, shift):
    for g in range(n_groups):
        first = shift == 32 - RADIX_BITS
        prefix, remaining = (0, int(kept[g])) if first else (int(state[3 * g]), int(state[3 * g + 1]))
        h = hist[g * BINS : (g + 1) * BINS]
        above, digit = 0, 0
        for b in range(BINS - 1, -1, -1):
            if above + int(h[b]) >= remaining:
                digit = b
                break
            above += int(h[b])
        state[3 * g] = prefix | (digit << shift)
        state[3 * g + 1] = remaining - above
        state[3 * g + 2] = h[digit]
        h[:] = 0


def topk_count_ties(x, bounds, blk_group, blk_start, state, blk_ties):
    for b in range(len(blk_group)):
        g = blk_group[b]
        start, end = _span(bounds, g, blk_start[b])
        blk_ties[b] = np.count_nonzero((x[start:end] & MAGNITUDE) == state[3 * g])


def topk_scan_ties(blk_ties, group_blocks, n_groups):
    for g in range(n_groups):
        before = 0
        for b in range(group_blocks[g], group_blocks[g + 1]):
            v = int(blk_ties[b])
            blk_ties[b] = before
            before += v


def topk_mask(x, bounds, blk_group, blk_start, state, blk_ties, mask, w, w_out, with_w):
    for b in range(len(blk_group)):
        g = blk_group[b]
        start, end = _span(bounds, g, blk_start[b])
        t, need = state[3 * g], int(state[3 * g + 1])
        key = x[start:end] & MAGNITUDE
        tie = key == t
        rank = int(blk_ties[b]) + np.cumsum(tie) - 1  # each tie's rank among its group's, by index
        kept = (key > t) | (tie & (rank < need))
        mask[start:end] = kept
        if with_w:
            np.multiply(w[start:end], kept.astype(np.float32), out=w_out[start:end])


MODEL = types.SimpleNamespace(topk_histogram=topk_histogram, topk_pick=topk_pick, topk_count_ties=topk_count_ties,
                              topk_scan_ties=topk_scan_ties, topk_mask=topk_mask)


# --- the driver ------------------------------------------------------------------------------------


class RadixTopK:
    """The exact top-k of |x| in each group (lo, hi) of a flat float32 array, as 11 kernel
    launches for all groups together. `kernels`: kernels.cuda()'s (CuPy) or MODEL (NumPy).
    Its buffers are allocated once; `select` allocates nothing and reads nothing back."""

    def __init__(self, xp, groups: list[tuple[int, int]], kernels=MODEL):
        self.xp, self.k, self.n_groups = xp, kernels, len(groups)
        blk_group, blk_start, group_blocks = [], [], [0]
        for g, (lo, hi) in enumerate(groups):
            starts = list(range(lo, hi, CHUNK)) or [lo]
            blk_group += [g] * len(starts)
            blk_start += starts
            group_blocks.append(len(blk_start))
        host = dict(bounds=np.array([b for span in groups for b in span], np.int64), blk_group=np.array(blk_group, np.int32),
                    blk_start=np.array(blk_start, np.int64), group_blocks=np.array(group_blocks, np.int32))
        for name, a in host.items():
            setattr(self, name, xp.asarray(a))
        self.n_blocks = len(blk_group)
        self.hist = xp.zeros(self.n_groups * BINS, np.uint32)
        self.state = xp.zeros(3 * self.n_groups, np.uint32)
        self.blk_ties = xp.zeros(self.n_blocks, np.uint32)
        self.kept = xp.zeros(self.n_groups, np.uint32)

    def set_kept(self, kept: list[int]) -> None:
        """How many values each group keeps (a host-to-device copy: once per k, not per step)."""
        self.kept[...] = self.xp.asarray(np.array(kept, np.uint32))

    def select(self, x, mask, w=None, w_out=None) -> None:
        """mask = the top-k of |x| per group; with w, also w_out = w * mask in the same pass."""
        k, bits, s = self.k, x.view(np.uint32), self.state
        tables = (self.bounds, self.blk_group, self.blk_start)
        for shift in SHIFTS:
            k.topk_histogram(bits, *tables, s, self.hist, shift)
            k.topk_pick(self.hist, s, self.kept, self.n_groups, shift)
        k.topk_count_ties(bits, *tables, s, self.blk_ties)
        k.topk_scan_ties(self.blk_ties, self.group_blocks, self.n_groups)
        with_w = w is not None
        k.topk_mask(bits, *tables, s, self.blk_ties, mask, w if with_w else x, w_out if with_w else x, int(with_w))

    def thresholds(self):
        """Each group's k-th largest |x| (as float32, on the device)."""
        return self.state[0::3].view(np.float32)
