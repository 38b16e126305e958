"""A training step and a measuring pass. On a GPU the step is replayed as CUDA graphs where the
method and optimizer allow (CapturedStep); elsewhere it runs as it is (EagerStep). Nothing here
reads back from the device but `evaluate`'s final sums."""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import numpy as np

from ..errors import failure
from ..kernels.backend import Backend
from ..nn import optim
from ..nn.layers import Conv2d, walk
from ..nn.model import Network, build_layers, cross_entropy, init_network
from .config import Config


def evaluate(net: Network, w_eff: list, x, y, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy of the network with effective weights `w_eff` on (x, y)."""
    xp = net.xp
    loss, correct = xp.zeros((), xp.float64), xp.zeros((), xp.int64)
    for i in range(0, len(y), batch_size):
        logits = net.logits(x[i : i + batch_size], w_eff)
        l, c, _ = cross_entropy(xp, logits, y[i : i + batch_size], grad=False)
        loss += l
        correct += c
    n = len(y)
    return float(loss) / n, float(correct) / n


def train_step(net: Network, opt, x, y, lr: float):
    """One SGD step on a batch: the mask, forward, loss, backward, update. Returns the batch's
    summed loss and number correct, as device scalars (reading them would sync a GPU)."""
    w_eff = net.effective_weights()
    logits, caches = net.forward(x, w_eff)
    loss_sum, correct, dlogits = cross_entropy(net.xp, logits, y)
    net.backward(caches, w_eff, dlogits)
    net.update(opt, lr)
    return loss_sum, correct


class CapturedStep:
    """train_step on a GPU as CUDA graphs: one per batch shape (the full batches, a smaller last
    one), each captured the second time its shape comes (the first runs as it is, so that every
    kernel is compiled and loaded first) and replayed from then on, for the whole run: one launch
    for a step's dozens of kernels. A graph holds fixed addresses and frozen arguments, so:
    - its inputs are static buffers that each batch is copied into;
    - the learning rate is a device scalar the graph reads (kernels.cu's sgd), set before each
      launch where it changed;
    - what it allocates comes from a memory pool of its own, which nothing else allocates from,
      so that no replay touches memory handed out again (a temporary the capture frees goes back
      to that pool, and only a later point of the same capture, in stream order, reuses it);
    - a new k (the k warm-up) drops the graphs (`set_k`): the array code's top-k takes k as a
      host number;
    - only methods and optimizers whose steps keep no other host state are replayed
      (`replayable`: not supermask's sampling, IteRand's redraws, or Adam's per-step bias
      corrections).
    The steps run on a stream of its own (a capture cannot use the default one), which the
    whole training loop uses (`with step.stream`)."""

    def __init__(self, net: Network, opt, xp):
        self.net, self.opt, self.xp = net, opt, xp
        xp.cuda.get_current_stream().synchronize()  # what the default stream still holds (the setup)
        self.stream = xp.cuda.Stream(non_blocking=True)
        self.pool = xp.cuda.MemoryPool()  # the captures' allocations, and no one else's
        self.lr, self.lr_value = xp.zeros((), np.float32), None
        self.failed, self.k = False, None
        self.graphs, self.seen = {}, set()  # shape -> (graph, x, y, out); the shapes run once

    @property
    def replaying(self) -> bool:
        return bool(self.graphs)

    def set_k(self, k) -> None:
        """The fraction the graphs were captured with; another drops them."""
        if k != self.k:
            self.graphs, self.seen, self.k = {}, set(), k

    def __call__(self, x, y, lr: float):
        if lr != self.lr_value:  # outside any capture: the graphs read it
            self.lr[...], self.lr_value = lr, lr
        if x.shape in self.graphs:
            graph, xs, ys, out = self.graphs[x.shape]
            xs[...], ys[...] = x, y
            graph.launch(stream=self.stream)
            self.opt.steps += 1  # what the step does on the host (the capture did it for its own)
            return out
        if x.shape in self.seen and not self.failed:
            return self._capture(x, y)
        self.seen.add(x.shape)
        return train_step(self.net, self.opt, x, y, lr)

    def _capture(self, x, y):
        xp = self.xp
        xs, ys = xp.empty_like(x), xp.empty_like(y)
        xs[...], ys[...] = x, y
        steps = self.opt.steps
        with xp.cuda.using_allocator(self.pool.malloc):
            self.stream.begin_capture()
            try:
                out = train_step(self.net, self.opt, xs, ys, self.lr)
                graph = self.stream.end_capture()
            except Exception as e:  # a CUDA call the capture cannot hold: nothing ran, train as it is
                try:
                    self.stream.end_capture()
                except Exception:
                    pass
                print(f"note: the training step cannot be captured as a CUDA graph ({failure(e)}); "
                      "running it without one (train.cuda_graph=false says so up front)", file=sys.stderr)
                self.failed, self.opt.steps = True, steps
                return train_step(self.net, self.opt, x, y, self.lr_value)
        self.graphs[x.shape] = graph, xs, ys, out
        graph.launch(stream=self.stream)
        return out


class EagerStep:
    """train_step as it is (the CPU; a GPU where the step cannot be replayed)."""

    stream = contextlib.nullcontext()
    replaying = False

    def __init__(self, net: Network, opt):
        self.net, self.opt = net, opt

    def set_k(self, k) -> None:
        pass

    def __call__(self, x, y, lr: float):
        return train_step(self.net, self.opt, x, y, lr)


def stepper(cfg: Config, backend: Backend, net: Network, opt):
    """How the run takes its training steps: replayed as CUDA graphs on a GPU (train.cuda_graph)
    where the method and the optimizer keep no host state in a step, else as they are."""
    if backend.is_gpu and cfg.train.cuda_graph and net.method.replayable and opt.replayable:
        return CapturedStep(net, opt, backend.xp)
    return EagerStep(net, opt)


def _one_channel(layers: list) -> list:
    """A written-out layer list with one channel per conv and block, one unit per linear, but
    the last weight layer's (the classes)."""
    size = {"conv": "channels", "residual": "channels", "linear": "units"}
    weighted = [i for i, item in enumerate(layers) if isinstance(item, dict) and next(iter(item)) in size]
    out = list(layers)
    for i in weighted[:-1]:
        (kind, p), = layers[i].items()
        out[i] = {kind: {**p, size[kind]: 1}}
    return out


def warm_up(cfg: Config, backend: Backend, info, steps: int = 6) -> None:
    """Train and measure a tiny network of the run's method and optimizer for a few steps, so that
    every fused loop the run calls is compiled (numba on the CPU, on a machine's first run: seconds;
    CUDA kernels on a GPU) before epoch 1 is timed: epoch_seconds never includes compilation. Its
    own weights, data and optimizer: nothing of the run changes. The loops compile for argument
    types, not sizes, so the tiny network compiles what the real one runs."""
    (h, w, c), classes = info.image_shape, info.n_classes
    tiny = [dataclasses.replace(cfg.model, arch="mlp", layers=None, widths=[h * w * c, 32, classes], width=1.0, bn="none",
                                k_warmup_epochs=0)]
    if any(isinstance(l, Conv2d) for l in walk(build_layers(np, cfg.model, (h, w, c), classes))):  # and its convs (col2im)
        tiny.append(dataclasses.replace(cfg.model, arch="custom", layers=_one_channel(cfg.model.layers), k_warmup_epochs=0))
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((8, h, w, c)).astype(np.float32))
    y = backend.asarray(rng.integers(0, classes, 8))
    for model in tiny:
        weights, scores = init_network(model, 0, (h, w, c), classes)
        net = Network(backend.xp, model, weights, scores, (h, w, c), classes)
        opt = optim.make(backend.xp, net.params, cfg.train)
        net.reseed(0, 0)
        for _ in range(steps):  # a few: the later steps take the paths that need a last threshold (settle)
            train_step(net, opt, x, y, cfg.train.lr)
        evaluate(net, net.effective_weights(train=False), x, y, len(y))
    backend.sync()
