"""The score network: initialization, and the Network (its layers built by architectures.py)
that holds the frozen weights, the learned tensor and the masks as flat buffers.

Every weight layer computes with effective weights W_eff instead of its frozen random weights W;
how W_eff is made and how dL/dW_eff reaches what is learned is the network's method
(methods.py: edge-popup, biprop, supermask, dense). The layers never know which method is in
use. No biases; ReLU between layers, none after the last.

All array code is written against `xp` (numpy or cupy).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..kernels.backend import fused
from .architectures import ARCHITECTURES, build_layers  # noqa: F401 - the registry, re-exported
from .layers import backward_all, forward_all, norm_layers, weight_layers
from .methods import METHODS

if TYPE_CHECKING:  # annotations only: nn/ does not depend on run/
    from ..run.config import ModelConfig

RELU_GAIN = math.sqrt(2.0)


# --- initialization (on the host, so a seed gives the same network on every backend) ----------


def draw_weights(rng: np.random.Generator, cfg: ModelConfig, layer) -> np.ndarray:
    """A weight layer's random weights, float32, as cfg.init says (and IteRand redraws them)."""
    k = cfg.k if getattr(layer, "keep", None) is None else layer.keep  # the layer's own k, where it has one
    fan = layer.fan_in * k if cfg.scale_fan else layer.fan_in
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
            self.logits(x, w_eff, train=True)
        for n, m in zip(self.norms, saved):
            n.momentum = m

    def forward(self, x, w_eff: list, train: bool = True):
        """Logits, and what each layer keeps for the backward pass. `train`: the training pass
        (BatchNorm normalizes by the batch and moves its running statistics), else measuring."""
        return forward_all(self.layers, x, w_eff, train)

    def logits(self, x, w_eff: list, train: bool = False):
        """The forward pass of a measurement (or of BatchNorm's recalibration, `train`): the
        logits alone, each layer's backward cache dropped as the next layer runs, so that the
        pass holds one layer's im2col patches at a time, not the whole net's."""
        for layer in self.layers:
            x = layer.forward(x, w_eff, train)[0]  # (not `x, _ =`: that would keep a cache through the next layer)
        return x

    def backward(self, caches: list, w_eff: list, dlogits) -> None:
        """dL/dW_eff, from dL/dlogits, into self.grads (views of self.g_flat)."""
        backward_all(self.layers, caches, dlogits, w_eff, self.grads, first=self.first, first_dx=False)

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
