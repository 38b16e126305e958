"""The training loop: data on the device once, one epoch at a time, a checkpoint after each.

The data order of epoch e is a permutation drawn from (seed, e) alone, and the learning rate
is a function of e, so a run resumed from its last checkpoint continues exactly as the
uninterrupted run would have. Within an epoch nothing is read back from the device but the
running loss for the progress display (at most a few times a second).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import data, environment, optim, store, tensorboard
from .backend import Backend, address_limit
from .config import Config, dump
from .errors import ConfigError, RunError
from .methods import METHODS, k_at
from .layers import weight_layers
from .model import Network, build_layers, cross_entropy, init_network


@dataclass
class DeviceData:
    x_train: object
    y_train: object
    x_test: object
    y_test: object
    mean: list[float]  # per channel, of inputs scaled to [0, 1]
    std: list[float]
    x_val: object = None  # data.val_samples held-out training images (None: no split)
    y_val: object = None


def load_data(cfg: Config, backend: Backend, mean=None, std=None) -> DeviceData:
    """Read, standardize and move the dataset to the device, once, as float32 [N, H, W, C].
    `mean`/`std` default to the training set's (a resumed or re-evaluated run passes the ones
    it recorded)."""
    d = cfg.data
    ds = data.load(d.name, d.root)
    x_train, y_train = ds.x_train[: d.train_samples], ds.y_train[: d.train_samples]
    x_test, y_test = ds.x_test[: d.test_samples], ds.y_test[: d.test_samples]
    x_val = y_val = None
    if d.val_samples:  # held out before anything else sees the training images (the standardization too)
        if d.val_samples >= len(y_train):
            raise ConfigError(f"data.val_samples: expected fewer than the {len(y_train):,} training images, got {d.val_samples}")
        train_idx, val_idx = data.validation_split(len(y_train), d.val_samples)
        x_train, y_train, x_val, y_val = x_train[train_idx], y_train[train_idx], x_train[val_idx], y_train[val_idx]
    if mean is None:
        channels = data.SHAPES[d.name][2]
        mean, std = data.standardization(x_train) if d.standardize else ([0.0] * channels, [1.0] * channels)
    dev = lambda x: None if x is None else backend.asarray(data.to_float(x, mean, std))  # noqa: E731
    return DeviceData(dev(x_train), backend.asarray(y_train), dev(x_test), backend.asarray(y_test), mean, std,
                      dev(x_val), None if y_val is None else backend.asarray(y_val))


def network(cfg: Config, backend: Backend, weights: list, scores: list | None, norms: list | None = None) -> Network:
    """The network of `cfg` for its dataset's image shape, its tensors (and a stored run's
    BatchNorm statistics) copied onto the device."""
    h, w, c, classes = data.SHAPES[cfg.data.name]
    return Network(backend.xp, cfg.model, weights, scores, (h, w, c), classes, norms)


def stored_subnetwork(net: Network, masks: list | None) -> list:
    """W_eff of a stored run's network: its stored masks applied (the subnetwork itself, as eval
    and export use it), or where it stores none (dense) the network's own measuring weights."""
    w_eff = net.effective_weights(train=False)
    return w_eff if masks is None else net.subnetwork(masks)


def memory_needed(cfg: Config, n_train: int, n_test: int) -> tuple[int, int, int]:
    """(weights, bytes for the tensors that grow with the network, bytes for the activations of
    the largest batch) of training `cfg` on n_train images and measuring n_test: what it holds at
    once at the least, computed from the layer shapes alone, before anything is allocated."""
    h, w, c, classes = data.SHAPES[cfg.data.name]
    layers = build_layers(np, cfg.model, (h, w, c), classes)
    n_weights = sum(math.prod(l.shape) for l in weight_layers(layers))
    shape, per_sample, widest = (h, w, c), math.prod((h, w, c)), 0
    for layer in layers:  # every layer's output (and a conv's patches) lives until the backward pass
        shape, extra = layer.output_shape(shape)
        per_sample += math.prod(shape) + extra
        widest = max(widest, math.prod(shape) + extra)  # a measuring pass holds one layer's at a time (Network.logits)
    slots = 2 if cfg.train.optimizer == "adam" else 1
    # float32 weights, gradient, optimizer slots and their scratch, the run's host copy; the score
    # methods add scores, mask (bool), W_eff, scratch and host copies of scores and mask
    per_weight = 4 * (3 + slots) + (0 if METHODS[cfg.model.method].learns == "weights" else 4 * 4 + 1 + 1)
    t = cfg.train
    batch, eval_batch = min(t.batch_size, n_train), min(t.eval_batch_size, n_test)
    activations = 4 * max(2 * batch * per_sample, eval_batch * widest)  # training keeps gradients too
    return n_weights, per_weight * n_weights, activations


def available_memory() -> tuple[int, str] | None:
    """(bytes, whose) this process can still allocate on the host: the kernel's MemAvailable, or
    less under an address-space limit (ulimit -v); None where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [(int(line.split()[1]) * 1024, "this machine has") for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    limit = address_limit()
    if limit is not None:
        used = 0
        try:
            with open("/proc/self/status") as f:
                used = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
        except OSError:
            pass
        found.append((limit - used, "the process's memory limit (ulimit -v) leaves"))
    return min(found) if found else None


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**40 else f"{n / 2**40:,.1f} TiB"


def check_memory(cfg: Config, backend: Backend, dd: DeviceData) -> None:
    """A ConfigError (one line, exit 2) for a spec that cannot fit in memory, before any of it is
    allocated: an impossible allocation would otherwise fail deep inside NumPy, or be killed by
    the kernel. Only what certainly coexists is counted, so no spec that fits is refused."""
    n_weights, tensors, activations = memory_needed(cfg, len(dd.y_train), len(dd.y_test))
    free = (backend.xp.cuda.Device().mem_info[0], f"{backend.device} has") if backend.is_gpu else available_memory()
    if free is None or tensors + activations <= free[0]:
        return
    free, where = free
    if tensors >= activations:
        key = "model.widths" if cfg.model.arch == "mlp" else "model.width"
        what = f"the network has {n_weights:,} weights and needs at least {gib(tensors + activations)} to train"
    else:
        key = "train.batch_size or train.eval_batch_size"
        what = f"its batches need at least {gib(activations)} for their activations"
    raise ConfigError(f"model: {what}, but {where} {gib(free)} available: use a smaller {key}")


def initial_tensors(cfg: Config):
    h, w, c, classes = data.SHAPES[cfg.data.name]
    return init_network(cfg.model, cfg.seed, (h, w, c), classes)


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


class Interrupted(Exception):
    def __init__(self, signum: int):
        self.signum = signum


class StopOnSignal:
    """SIGINT/SIGTERM set a flag that the loop checks between batches, so the process never
    stops in the middle of a checkpoint write."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def check(self):
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


class Diverged(Exception):
    pass


class CheckpointError(Exception):
    """run.h5 could not be written (a full disk, a read-only or vanished folder, no memory left
    to write it with). The file on disk is still the last complete checkpoint, of `kept` epochs."""

    def __init__(self, error: OSError | MemoryError, kept: int):
        super().__init__(failure(error))
        self.kept = kept
        self.stopped = None  # what stopped the run, where the checkpoint recording it failed


def os_reason(e: OSError) -> str:
    """An OSError as a few words: 'the disk is full' rather than h5py's chain of HDF5 messages."""
    said = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only", errno.EDQUOT: "the disk quota is exceeded"}
    if e.errno in said:
        return f"{said[e.errno]} ({os.strerror(e.errno)})"
    return os.strerror(e.errno) if e.errno else (str(e).splitlines() or [type(e).__name__])[0]


def checkpoint(run_dir, run: store.Run) -> None:
    """store.save, with a CheckpointError for a file that cannot be written."""
    try:
        store.save(run_dir, run)
    except (OSError, MemoryError) as e:
        raise CheckpointError(e, run.epochs_saved) from None


def fit(cfg: Config, run_dir, backend: Backend, run: store.Run, dd: DeviceData, reporter) -> store.Run:
    """Train from the state in `run` (fresh or resumed) to cfg.train.epochs, checkpointing `run`
    after every epoch. On a signal, divergence or error the last finished epoch is saved with
    status "interrupted" or "failed" and the exception is re-raised."""
    # The handlers stay installed while the final checkpoint is written, so a second Ctrl-C
    # cannot cut it short; numpy's overflow warnings are silenced because divergence is
    # detected (and reported in one line) at the end of the epoch.
    with StopOnSignal() as stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        try:
            # compile before the first epoch's clock starts, and before the network's buffers take
            # memory: under a memory limit LLVM aborts the process where its allocations fail
            warm_up(cfg, backend)
            net, opt = _network_and_optimizer(cfg, backend, run)
            reporter.start(run_dir, cfg, backend, run.epochs_done)
            step = stepper(cfg, backend, net, opt)
            log = tensorboard.EpochLog(run_dir, run.epochs_done + 1) if cfg.train.tensorboard else None
            try:
                with step.stream:
                    _epochs(cfg, run_dir, backend, run, dd, reporter, net, opt, stop, step, log)
            finally:
                if log:
                    log.close()
        except CheckpointError:
            raise  # nothing more can be written; run.h5 keeps the last complete checkpoint
        except BaseException as e:  # keep the last finished epoch, and say why the run stopped
            if isinstance(e, Interrupted):
                status, message = "interrupted", f"stopped by {signal.Signals(e.signum).name}"
            elif isinstance(e, Diverged):
                status, message = "failed", str(e)
            else:
                status, message = "failed", failure(e)
            run.attrs["status"], run.attrs["message"] = status, message
            try:
                checkpoint(run_dir, run)
            except CheckpointError as c:
                c.stopped = message
                raise c from None
            raise
    return run


def failure(e: BaseException) -> str:
    """What stopped a run, in one line, for run.h5's `message` and the command line."""
    if isinstance(e, MemoryError):
        return f"out of memory ({str(e).splitlines()[0] if str(e) else 'an allocation failed'})"
    if isinstance(e, OSError):
        return os_reason(e)
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{e.__class__.__name__}: {first}" if first else e.__class__.__name__


def warm_up(cfg: Config, backend: Backend, steps: int = 6) -> None:
    """Train and measure a tiny network of the run's method and optimizer for a few steps, so that
    every fused loop the run calls is compiled (numba on the CPU, on a machine's first run: seconds;
    CUDA kernels on a GPU) before epoch 1 is timed: epoch_seconds never includes compilation. Its
    own weights, data and optimizer: nothing of the run changes. The loops compile for argument
    types, not sizes, so the tiny network compiles what the real one runs."""
    h, w, c, classes = data.SHAPES[cfg.data.name]
    tiny = [dataclasses.replace(cfg.model, arch="mlp", widths=[h * w * c, 32, classes], k_warmup_epochs=0)]
    if cfg.model.arch != "mlp":  # and its own layers at one channel each, for the conv loops (col2im)
        tiny.append(dataclasses.replace(cfg.model, width=1e-3, k_warmup_epochs=0))
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


def _network_and_optimizer(cfg: Config, backend: Backend, run: store.Run):
    """The network and optimizer on the device, from the run's state (fresh or resumed). The
    network holds copies: training updates its arrays in place, and the checkpoint saved on an
    interrupt must still hold the last finished epoch (run.*)."""
    net = network(cfg, backend, run.weights, run.scores, run.norms)
    opt = optim.make(backend.xp, net.params, cfg.train)
    if run.optimizer is not None:  # resuming
        opt.steps = run.optimizer["steps"]
        for slot, arrays in run.optimizer["slots"].items():
            for buf, a in zip(opt.state[slot], arrays):
                buf[...] = backend.asarray(a)
    return net, opt


def enter_epoch(net: Network, cfg: Config, epoch: int) -> float:
    """What the network's method makes of an epoch (0-based): its random stream (supermask's
    samples) and its fraction k (the k warm-up), both functions of (seed, epoch) alone. Returns k."""
    net.reseed(cfg.seed, epoch)
    k = k_at(cfg.model.k, cfg.model.k_warmup_epochs, epoch)
    net.set_k(k)
    return k


def _epochs(cfg: Config, run_dir, backend: Backend, run: store.Run, dd: DeviceData, reporter, net, opt, stop, step, log=None) -> None:
    xp, t, d = backend.xp, cfg.train, cfg.data
    n = len(dd.y_train)
    n_batches = math.ceil(n / t.batch_size)
    augmenting = d.crop_padding > 0 or d.flip
    host = lambda arrs: None if arrs is None else [backend.to_host(a) for a in arrs]  # noqa: E731
    if net.scores is not None and run.masks is None:  # the starting masks, that mask_change counts from
        enter_epoch(net, cfg, 0)
        net.effective_weights(train=False)
        run.masks = host(net.masks)
    for epoch in range(run.epochs_done, t.epochs):
        stop.check()  # a signal during the last evaluation or checkpoint: stop before training on
        lr = optim.lr_at(t, epoch)
        # Everything random in an epoch follows from (seed, epoch): a resumed run repeats it.
        perm = backend.asarray(np.random.default_rng([cfg.seed, epoch]).permutation(n))
        aug_rng = np.random.default_rng([cfg.seed, epoch, 2])
        k = enter_epoch(net, cfg, epoch)
        step.set_k(k)  # (CUDA graphs are captured with it)
        loss_sum, correct = xp.zeros((), xp.float64), xp.zeros((), xp.int64)
        reporter.epoch_start(epoch + 1, t.epochs, lr, n_batches)
        t0 = time.perf_counter()
        for b in range(n_batches):
            idx = perm[b * t.batch_size : (b + 1) * t.batch_size]
            x = dd.x_train[idx]
            if augmenting:
                x = data.augment(xp, x, aug_rng, d.crop_padding, d.flip)
            l, c = step(x, dd.y_train[idx], lr)
            loss_sum += l
            correct += c
            seen = min(n, (b + 1) * t.batch_size)
            reporter.batch(b + 1, lambda: (float(loss_sum) / seen, float(correct) / seen))
            stop.check()
        backend.sync()
        seconds = time.perf_counter() - t0
        train_loss, train_acc = float(loss_sum) / n, float(correct) / n
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss became {train_loss} in epoch {epoch + 1} (learning rate {lr:g} too high?)")
        if not all(bool(xp.isfinite(p).all()) for p in net.params):  # edge-popup's loss stays finite on nan scores
            what = "scores" if net.scores is not None else "weights"
            raise Diverged(f"the {what} became nan or inf in epoch {epoch + 1} (learning rate {lr:g} too high?)")
        w_eff = net.effective_weights(train=False)
        if t.bn_recalibration and net.norms:
            recalibrate(net, w_eff, dd.x_train, cfg, epoch)
        test_loss, test_acc = evaluate(net, w_eff, dd.x_test, dd.y_test, t.eval_batch_size)
        val_loss = val_acc = float("nan")
        if dd.y_val is not None:
            val_loss, val_acc = evaluate(net, w_eff, dd.x_val, dd.y_val, t.eval_batch_size)
        change = float("nan")
        if net.scores is not None:
            masks = host(net.masks)
            changed = [int((a != b).sum()) for a, b in zip(run.masks, masks)]
            change = sum(changed) / sum(m.size for m in masks)
            run.mask_change_layers.append([c / m.size for c, m in zip(changed, masks)])
            run.scores, run.masks = host(net.scores), masks
        row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc,
                   test_loss=test_loss, test_acc=test_acc, epoch_seconds=seconds, mask_change=change,
                   val_loss=val_loss, val_acc=val_acc)
        for key, value in row.items():
            run.metrics[key].append(value)
        if net.method.changes_weights:  # dense trains them, IteRand redraws the pruned ones
            run.weights = host(net.weights)
        if net.norms:
            run.norms = host(net.norm_state())
        run.optimizer = {"name": t.optimizer, "steps": opt.steps,
                         "slots": {s: host(v) for s, v in opt.state.items()}}
        if run.epochs_done == t.epochs:
            run.attrs["status"] = "completed"
        checkpoint(run_dir, run)
        if log:  # what is logged is what run.h5 holds
            log.epoch(row, k, run.mask_change_layers[-1] if net.scores is not None else None)
        reporter.epoch_end(row)


def recalibrate(net: Network, w_eff: list, x_train, cfg: Config, epoch: int) -> None:
    """BatchNorm's running statistics from train.bn_recalibration training images under this
    epoch's final mask, in training-size batches, not augmented. The images are drawn from
    (seed, epoch), so a resumed run repeats the choice."""
    t = cfg.train
    pick = np.random.default_rng([cfg.seed, epoch, 3]).permutation(len(x_train))[: t.bn_recalibration]
    idx = net.xp.asarray(pick)
    net.recalibrate(w_eff, (x_train[idx[i : i + t.batch_size]] for i in range(0, len(pick), t.batch_size)))


def new_run(cfg: Config, backend: Backend, dd: DeviceData) -> store.Run:
    """A fresh run: the seed's weights (and scores), no epochs yet."""
    weights, scores = initial_tensors(cfg)
    attrs = store.base_attrs(cfg.seed, backend.name, backend.device, dd.mean, dd.std, dump(cfg))
    run = store.Run(attrs=attrs, weights=weights, scores=scores, k=cfg.model.k)
    store.record_environment(run, environment.describe(backend))
    return run



def check_resumable(run: store.Run, run_dir, locked: bool = False) -> None:
    """Refuse a completed run, and one still training. `locked`: this process holds the run's
    lock (store.claim), so a "running" record is a writer that died (on another host, say)."""
    status = store.live_status(run)
    if status == "completed":
        raise RunError(f"{run_dir}: the run is already completed ({run.epochs_done} epoch{'' if run.epochs_done == 1 else 's'}); nothing to resume")
    if status == "running" and not locked:
        raise RunError(f"{run_dir}: the run is still training (pid {run.attrs.get('pid')}); resume it once it has stopped")
