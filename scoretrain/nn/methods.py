"""The mask methods. Each is one class: how a layer's effective weights W_eff come from its frozen
random weights W and its learned scores S, how dL/dW_eff reaches what is learned, and whether a
fraction k applies. METHODS is the registry (run/config.py takes the method names from it): adding a
method is adding a class here. docs/methods.md states each exactly.

The algorithm itself is the first two functions: `topk_mask` (keep the round(k * n) largest
|S|) and `straight_through` (dL/dS = dL/dW_eff * W * sign(S), as if the mask were the identity on
|S|). They are plain array code, the reference. Beside them are the fast paths for the same step: the
CPU's (FusedScoreStep and the fused top-k, kernels/loops.py), checked bit for bit against the
reference in tests/test_model.py, and the GPU's top-k (radix_select.py, a radix select in CUDA).

Network (model.py) owns the flat buffers every method shares (weights w_flat, scores s_flat,
masks m_flat, W_eff we_flat, gradients g_flat, scratch tmp); a method owns only its own state
(thresholds, alphas, a sampling stream) and acts on the network's buffers. All array code is
written against `xp` (numpy or cupy).
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels.backend import fused
from ..kernels.radix_select import RadixTopK

# --- the mask and its straight-through gradient (the reference) --------------------------------


def kept_count(k: float, n: int) -> int:
    """How many of n weights a fraction k keeps: round(k * n), at least one."""
    return max(1, min(n, int(round(k * n))))


def k_at(k: float, warmup_epochs: int, epoch: int) -> float:
    """The fraction kept in epoch `epoch` (0-based) under a k warm-up (model.k_warmup_epochs):
    k falls geometrically from 1, as biprop's prune-rate schedule, k ** ((epoch + 1) / warmup),
    reaching k in epoch warmup - 1 and staying there; k itself without one."""
    return k if epoch + 1 >= warmup_epochs else k ** ((epoch + 1) / warmup_epochs)


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


# --- the CPU's fast path for the same step -------------------------------------------------------


def band_bounds(hint, band: float) -> tuple[float, float]:
    """The magnitudes (lo, hi) within a relative half-width `band` of the last threshold."""
    h = float(hint)  # Python floats: NumPy scalar arithmetic costs microseconds, per step
    return h * (1 - min(band, 1.0)), h * (1 + band)


def _topk_fused(kernels, flat, k: int, hint, band: float, mask, w, w_out):
    """topk_mask on the CPU (kernels/loops.py), returning the threshold.

    Scores move little per step, so the new threshold is near the last one: one pass
    (kernels.score_step with no update) keeps the values above a band of relative half-width
    `band` around the hint, drops those below it, and notes those in it; if the k-th largest is
    among them, only they are partitioned (kernels.settle). A miss widens the band tenfold; a
    second miss, or no hint, partitions everything. (FusedScoreStep makes the first pass in its
    optimizer loop.)"""
    if hint is not None and hint > 0:
        b = kernels.Band(np.array([[0, flat.size]]), np.empty((1, 2), np.float32), mask,
                         np.empty(flat.size, np.int64), np.empty((1, 2), np.int64))
        for r in (band, 10 * band):
            b.bounds[0] = band_bounds(hint, r)
            kernels.score_step(flat, None, None, None, w, b, w_out)
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


class FusedScoreStep:
    """Edge-popup's whole step on the scores, on the CPU, as one loop (kernels.score_step): the
    straight-through gradient from dL/dW_eff, the optimizer's update, and the next top-k's pass
    over the new scores against each group's band, writing the mask and W_eff as it goes. The
    next selection then settles only the values in each band. Until then the masks and W_eff are
    that loop's partial result."""

    def __init__(self, net, groups: list[tuple[int, int]]):
        k = fused(np)
        self.kernels = k
        self.band = k.Band(np.array(groups, np.int64), np.zeros((len(groups), 2), np.float32), net.m_flat,
                           np.empty(net.s_flat.size, np.int64), np.full((len(groups), 2), -1))

    def update(self, net, opt, lr: float, thresholds: list, bands: list) -> None:
        self.band.bounds[:] = [band_bounds(hint or 0.0, r) for hint, r in zip(thresholds, bands)]
        opt.step_fused(lr, lambda rule, state, scalars: self.kernels.score_step_with(
            rule, net.s_flat, net.g_flat, state, scalars, net.w_flat, self.band, net.we_flat))

    def swept(self) -> list[list[int]]:
        """Per group, (above, found) of the last update's pass; (-1, -1) once used."""
        return self.band.counts.tolist()  # Python ints: NumPy scalar comparisons cost microseconds

    def settle(self, net, g: int, lo: int, hi: int, k: int, above: int, found: int):
        return _settle(self.kernels, net.s_flat[lo:hi], k, above, self.band.index[lo : lo + found],
                       net.m_flat[lo:hi], net.w_flat[lo:hi], net.we_flat[lo:hi])

    def used(self) -> None:
        self.band.counts[:] = -1  # (-1 never hits): the scores change before the next update's pass


# --- the methods ---------------------------------------------------------------------------------


class Method:
    """What every method says about itself. `learns`: what the optimizer updates ("scores", or
    "weights" for the ordinary network). `uses_k`: it keeps exactly round(k * n) weights."""

    name = ""
    learns = "scores"
    uses_k = False
    changes_weights = False  # the weights change during training (and are stored at every checkpoint)
    replayable = True  # a step keeps no host state a CUDA graph would freeze (step.CapturedStep)

    def __init__(self, net, cfg):
        pass

    def reseed(self, net, seed: int, epoch: int) -> None:
        """Set the random stream of an epoch (a function of (seed, epoch) only, so a resumed run
        draws the same); only stochastic methods have one."""

    def set_k(self, k: float) -> None:
        """Keep the fraction k from now on (a k warm-up); only the methods that use k have one."""

    def effective_weights(self, net, train: bool) -> list:
        """W_eff per layer (views of net.we_flat), the masks in net.masks."""
        raise NotImplementedError

    def combine(self, net) -> list:
        """W_eff from the masks as they are in net.masks (a stored run's)."""
        return masked(net)

    def gradient(self, net) -> None:
        """backward's dL/dW_eff (net.g_flat) -> dL/d(learned tensor), into net.sg_flat (which is
        net.g_flat itself, updated in place, unless scores cover several weights)."""
        raise NotImplementedError

    def update(self, net, opt, lr: float) -> None:
        """The optimizer's step on what is learned, from backward's dL/dW_eff."""
        self.gradient(net)
        opt.step(net.params, net.param_grads, lr)


def masked(net) -> list:
    """W_eff = W * M."""
    xp = net.xp
    if xp is np and fused(xp, net.w_flat):
        fused(xp).masked(net.w_flat, net.m_flat, net.we_flat)
    else:
        xp.multiply(net.w_flat, net.m_flat, out=net.we_flat)
    return net.w_eff


class Dense(Method):
    """The ordinary network: W itself is trained."""

    name, learns, changes_weights = "dense", "weights", True

    def effective_weights(self, net, train: bool) -> list:
        return net.weights

    def combine(self, net) -> list:
        return net.weights

    def gradient(self, net) -> None:
        pass  # dL/dW_eff is dL/dW


class TopK(Method):
    """The exact top-k of |S| per group: each layer (k_scope: layer) or the whole network
    (k_scope: global). Each group's last threshold is the next selection's hint."""

    uses_k = True

    def __init__(self, net, cfg):
        # (span of the flat scores, its own fraction or None for model.k): a weight layer's own k
        # (model.layers), or 1 for model.dense_first / dense_last, makes it a group of its own; a
        # global k spans the layers between (config refuses layers of their own k inside that span)
        bounds = net.score_bounds
        own = {i: getattr(l, "keep", None) for i, l in enumerate(net.weight_layers)}
        own.update({i: 1.0 for i, on in ((0, cfg.dense_first), (len(bounds) - 1, cfg.dense_last)) if on})
        own = {i: k for i, k in own.items() if k is not None}
        pooled = [b for i, b in enumerate(bounds) if i not in own]
        if cfg.k_scope == "global" and pooled:
            spans = [(bounds[i], k) for i, k in own.items()] + [((pooled[0][0], pooled[-1][1]), None)]
        else:
            spans = [(b, own.get(i)) for i, b in enumerate(bounds)]
        spans.sort(key=lambda span: span[0])
        self.groups, self.group_k = [b for b, _ in spans], [k for _, k in spans]
        self.k = cfg.k
        # the GPU's top-k: a radix select of all groups in a few kernel launches (radix_select.py)
        cuda = fused(net.xp, net.s_flat) if net.xp is not np else None
        self.radix = RadixTopK(net.xp, self.groups, cuda) if cuda else None
        self.set_k(cfg.k)
        self.thresholds = [None] * len(self.groups)  # last step's: a hint for the next selection
        self.bands = [0.01] * len(self.groups)  # where the hint's band starts (CPU), from the last move
        self.fast = None  # a FusedScoreStep, where the method has one and the backend runs it

    def set_k(self, k: float) -> None:
        # a group of its own k follows a k warm-up in step: own ** (log k / log model.k)
        at = math.log(k) / math.log(self.k) if self.k < 1 else 1.0
        self.kept = [hi - lo if own == 1.0 else kept_count(k if own is None else own**at, hi - lo)  # the hints stay good: they only speed it up
                     for (lo, hi), own in zip(self.groups, self.group_k)]
        if self.radix:
            self.radix.set_kept(self.kept)

    def select(self, net, with_w_eff: bool) -> None:
        """The masks (and, `with_w_eff`, W * M in the same pass) of the current scores: the top-k
        of the scores' units (each weight, or each kernel or filter), then the weights' masks."""
        xp = net.xp
        if self.radix:  # the GPU: every group at once, no host read
            keep = not net.granular and with_w_eff
            self.radix.select(net.s_flat, net.u_flat, net.w_flat if keep else None, net.we_flat if keep else None)
            self._expand(net, with_w_eff)
            return
        swept = self.fast.swept() if self.fast else [(-1, -1)] * len(self.groups)
        for g, (lo, hi) in enumerate(self.groups):
            hint, k, (above, found) = self.thresholds[g], self.kept[g], swept[g]
            # the last update swept the scores, and the band holds the k-th (the counts first: on the
            # GPU there is no sweep, and `hint` is a 0-d device array whose truth a host read would tell)
            if above < k <= above + found and hint:
                t = self.fast.settle(net, g, lo, hi, k, above, found)
            else:
                keep = (net.w_flat[lo:hi], net.we_flat[lo:hi]) if with_w_eff and not net.granular else None
                _, t = topk_mask(xp, net.s_flat[lo:hi], k, hint, net.u_flat[lo:hi], self.bands[g], keep)
            if xp is np and hint and t:  # the next band (CPU): a few times this step's move
                self.bands[g] = min(0.1, max(1e-3, 4 * abs(float(t) / float(hint) - 1)))
            self.thresholds[g] = t
        if self.fast:
            self.fast.used()
        self._expand(net, with_w_eff)

    @staticmethod
    def _expand(net, with_w_eff: bool) -> None:
        """The weights' masks (and W_eff) from their units', where a score covers several weights."""
        if net.granular:
            net.expand_masks()
            if with_w_eff:
                masked(net)

    def through(self, net, w) -> None:
        """net.sg_flat = dL/dS through W_eff = w * |S| (broadcast over each score's weights)."""
        if not net.granular:
            straight_through(net.xp, net.g_flat, w, net.s_flat, net.tmp)
            return
        net.sum_units(net.xp.multiply(net.g_flat, w, out=net.tmp))
        times_sign(net.xp, net.sg_flat, net.s_flat, net.u_tmp)


class EdgePopup(TopK):
    """Ramanujan et al. 2020: W_eff = W * M(|S|), M the top-k of |S|; dL/dS = dL/dW_eff * W * sign(S)."""

    name = "edge-popup"

    def __init__(self, net, cfg):
        super().__init__(net, cfg)
        if net.xp is np and not net.granular and net.bn_flat is None and fused(np, net.s_flat):  # (one learned tensor)
            self.fast = FusedScoreStep(net, self.groups)

    def effective_weights(self, net, train: bool) -> list:
        self.select(net, with_w_eff=True)  # W_eff is written in the same pass
        return net.w_eff

    def gradient(self, net) -> None:
        self.through(net, net.w_flat)

    def update(self, net, opt, lr: float) -> None:
        if self.fast is None:
            return super().update(net, opt, lr)
        self.fast.update(net, opt, lr, self.thresholds, self.bands)


class Biprop(TopK):
    """Diffenderfer & Kailkhura 2021: W_eff = alpha * sign(W) * M(|S|), alpha the mean |W| of the
    layer's kept weights, held constant in the backward pass."""

    name = "biprop"

    def __init__(self, net, cfg):
        super().__init__(net, cfg)
        self.w_sign, self.w_abs = net.xp.sign(net.w_flat), net.xp.abs(net.w_flat)
        self.alphas = [None] * len(net.layer_bounds)

    def effective_weights(self, net, train: bool) -> list:
        self.select(net, with_w_eff=False)  # W_eff needs alpha, which needs the mask first
        return self.combine(net)

    def combine(self, net) -> list:
        xp = net.xp
        for i, (lo, hi) in enumerate(net.layer_bounds):
            m = net.m_flat[lo:hi]
            self.alphas[i] = (self.w_abs[lo:hi] * m).sum() / xp.maximum(m.sum(), 1)
            xp.multiply(self.w_sign[lo:hi], m, out=net.we_flat[lo:hi])
            net.we_flat[lo:hi] *= self.alphas[i]
        return net.w_eff

    def gradient(self, net) -> None:
        self.through(net, self.w_sign)
        for i, (lo, hi) in enumerate(net.score_bounds):
            net.sg_flat[lo:hi] *= self.alphas[i]


class Supermask(Method):
    """Zhou et al. 2019: M ~ Bernoulli(sigmoid(S)), a fresh sample every step; W_eff = W * M and
    dL/dS = dL/dW_eff * W * sigmoid'(S). Measuring uses one sample too, fixed per (seed, epoch)
    so that it is reproducible and can be stored: the most likely mask (S > 0) keeps every
    weight with p > 0.5 at full strength, a network training never saw, and measures far worse."""

    name = "supermask"
    replayable = False  # its sampling stream advances on the host

    def __init__(self, net, cfg):
        self.rng = None  # a Generator, set by reseed() at each epoch

    def reseed(self, net, seed: int, epoch: int) -> None:
        self.rng = net.xp.random.default_rng(int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0]))
        self.measure_seed = int(np.random.SeedSequence([seed, epoch, 3]).generate_state(1)[0])

    def effective_weights(self, net, train: bool) -> list:
        xp = net.xp
        if self.rng is None:
            self.reseed(net, 0, 0)
        if train:
            u = self.rng.random(net.s_flat.shape, dtype=np.float32)
        else:  # drawn on the host (once an epoch): the same stored mask on NumPy and CuPy
            u = xp.asarray(np.random.default_rng(self.measure_seed).random(net.s_flat.shape, dtype=np.float32))
        xp.less(u, sigmoid(xp, net.s_flat, out=net.tmp), out=net.m_flat)
        return masked(net)

    def gradient(self, net) -> None:
        p = sigmoid(net.xp, net.s_flat, out=net.tmp)
        g = net.g_flat
        g *= net.w_flat
        g *= p
        g *= 1 - p


class IteRand(EdgePopup):
    """Chijiwa et al. 2021 (IteRand): edge-popup, and every `rerand_freq` optimizer steps each
    pruned weight is redrawn from the weights' init with probability `rerand_rate` (the paper's
    Bernoulli mode). The draws come from numpy.random.default_rng([seed, step, 4]) on the host,
    so a resumed run redraws the same; kept weights never change, so neither does W_eff."""

    name, changes_weights = "iterand", True
    replayable = False  # the redraws are decided and drawn on the host

    def __init__(self, net, cfg):
        super().__init__(net, cfg)
        self.freq, self.rate, self.seed = cfg.rerand_freq, cfg.rerand_rate, 0

    def reseed(self, net, seed: int, epoch: int) -> None:
        self.seed = seed

    def update(self, net, opt, lr: float) -> None:
        super().update(net, opt, lr)
        if opt.steps % self.freq == 0:
            self.rerandomize(net, opt.steps)

    def rerandomize(self, net, step: int) -> None:
        self.select(net, with_w_eff=True)  # the exact masks of the updated scores: which weights are pruned
        rng = np.random.default_rng([self.seed, step, 4])
        for i, (lo, hi) in enumerate(net.layer_bounds):
            fresh, redraw = net.draw(rng, i).ravel(), rng.random(hi - lo, dtype=np.float32) < self.rate
            pruned = net.xp.asarray(redraw) & ~net.m_flat[lo:hi]
            net.w_flat[lo:hi] = net.xp.where(pruned, net.xp.asarray(fresh), net.w_flat[lo:hi])


METHODS = {m.name: m for m in (EdgePopup, Dense, Supermask, Biprop, IteRand)}
K_METHODS = tuple(name for name, m in METHODS.items() if m.uses_k)  # the methods that keep a fixed fraction k
