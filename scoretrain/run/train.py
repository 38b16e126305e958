"""The training loop: one epoch at a time, a checkpoint after each.

The data order of epoch e is a permutation drawn from (seed, e) alone, and the learning rate
is a function of e, so a run resumed from its last checkpoint continues exactly as the
uninterrupted run would have. Within an epoch nothing is read back from the device but the
running loss for the progress display (at most a few times a second).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import numpy as np

from ..data import datasets as data
from ..errors import failure
from ..kernels.backend import Backend
from ..nn import optim
from ..nn.methods import k_at
from ..nn.model import Network
from . import store, tensorboard
from .config import Config
from .resources import DeviceData, network
from .step import evaluate, stepper, warm_up


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
            warm_up(cfg, backend, dd.info)
            net, opt = _network_and_optimizer(cfg, backend, run, dd.info)
            reporter.start(run_dir, cfg, backend, run.epochs_done)
            step = stepper(cfg, backend, net, opt)
            log = tensorboard.EpochLog(run_dir, run.epochs_done + 1) if cfg.train.tensorboard else None
            try:
                with step.stream:
                    Loop(cfg, run_dir, backend, run, dd, reporter, net, opt, step, stop, log).run_epochs()
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


def _network_and_optimizer(cfg: Config, backend: Backend, run: store.Run, info):
    """The network and optimizer on the device, from the run's state (fresh or resumed). The
    network holds copies: training updates its arrays in place, and the checkpoint saved on an
    interrupt must still hold the last finished epoch (run.*)."""
    net = network(cfg, info, backend, run.weights, run.scores, run.norms)
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


@dataclass
class Loop:
    """One training session of a run: from its last finished epoch to cfg.train.epochs. `run` is
    what run.h5 holds (host arrays, the metrics); `net` and `opt` the device's working copies."""

    cfg: Config
    run_dir: object
    backend: Backend
    run: store.Run
    dd: DeviceData
    reporter: object  # progress.Reporter
    net: Network
    opt: object  # optim.SGD or optim.Adam
    step: object  # step.CapturedStep or step.EagerStep
    stop: StopOnSignal
    log: tensorboard.EpochLog | None = None

    def host(self, arrays):
        return None if arrays is None else [self.backend.to_host(a) for a in arrays]

    def run_epochs(self) -> None:
        if self.net.scores is not None and self.run.masks is None:  # the starting masks, that mask_change counts from
            enter_epoch(self.net, self.cfg, 0)
            self.net.effective_weights(train=False)
            self.run.masks = self.host(self.net.masks)
        for epoch in range(self.run.epochs_done, self.cfg.train.epochs):
            self.stop.check()  # a signal during the last evaluation or checkpoint: stop before training on
            lr = optim.lr_at(self.cfg.train, epoch)
            k = enter_epoch(self.net, self.cfg, epoch)
            self.step.set_k(k)  # (CUDA graphs are captured with it)
            train_loss, train_acc, seconds = self.train_epoch(epoch, lr)
            self.check_finite(epoch, lr, train_loss)
            test_loss, test_acc, val_loss, val_acc = self.measure(epoch)
            change = self.record_masks()  # after measure: the masks of the epoch's final scores
            row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc,
                       test_loss=test_loss, test_acc=test_acc, epoch_seconds=seconds,
                       mask_change=change, val_loss=val_loss, val_acc=val_acc)
            self.record(row, k)

    def train_epoch(self, epoch: int, lr: float) -> tuple[float, float, float]:
        """One pass over the training set: (mean loss, accuracy, seconds)."""
        xp, t, d, dd = self.backend.xp, self.cfg.train, self.cfg.data, self.dd
        n = len(dd.y_train)
        n_batches = math.ceil(n / t.batch_size)
        augmenting = d.crop_padding > 0 or d.flip
        # Everything random in an epoch follows from (seed, epoch): a resumed run repeats it.
        perm = self.backend.asarray(np.random.default_rng([self.cfg.seed, epoch]).permutation(n))
        aug_rng = np.random.default_rng([self.cfg.seed, epoch, 2])
        loss_sum, correct = xp.zeros((), xp.float64), xp.zeros((), xp.int64)
        self.reporter.epoch_start(epoch + 1, t.epochs, lr, n_batches)
        t0 = time.perf_counter()
        for b in range(n_batches):
            idx = perm[b * t.batch_size : (b + 1) * t.batch_size]
            x = dd.x_train[idx]
            if augmenting:
                x = data.augment(xp, x, aug_rng, d.crop_padding, d.flip)
            l, c = self.step(x, dd.y_train[idx], lr)
            loss_sum += l
            correct += c
            seen = min(n, (b + 1) * t.batch_size)
            self.reporter.batch(b + 1, lambda: (float(loss_sum) / seen, float(correct) / seen))
            self.stop.check()
        self.backend.sync()
        return float(loss_sum) / n, float(correct) / n, time.perf_counter() - t0

    def check_finite(self, epoch: int, lr: float, train_loss: float) -> None:
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss became {train_loss} in epoch {epoch + 1} (learning rate {lr:g} too high?)")
        if not all(bool(self.backend.xp.isfinite(p).all()) for p in self.net.params):  # edge-popup's loss stays finite on nan scores
            what = "scores" if self.net.scores is not None else "weights"
            raise Diverged(f"the {what} became nan or inf in epoch {epoch + 1} (learning rate {lr:g} too high?)")

    def measure(self, epoch: int) -> tuple[float, float, float, float]:
        """Test and validation loss and accuracy under the epoch's final mask (nan: no validation split)."""
        net, t, dd = self.net, self.cfg.train, self.dd
        w_eff = net.effective_weights(train=False)
        if t.bn_recalibration and net.norms:
            recalibrate(net, w_eff, dd.x_train, self.cfg, epoch)
        test_loss, test_acc = evaluate(net, w_eff, dd.x_test, dd.y_test, t.eval_batch_size)
        val_loss = val_acc = float("nan")
        if dd.y_val is not None:
            val_loss, val_acc = evaluate(net, w_eff, dd.x_val, dd.y_val, t.eval_batch_size)
        return test_loss, test_acc, val_loss, val_acc

    def record_masks(self) -> float:
        """The epoch's scores and masks into the run, and the fraction of the mask that moved."""
        if self.net.scores is None:
            return float("nan")
        masks = self.host(self.net.masks)
        changed = [int((a != b).sum()) for a, b in zip(self.run.masks, masks)]
        self.run.mask_change_layers.append([c / m.size for c, m in zip(changed, masks)])
        self.run.scores, self.run.masks = self.host(self.net.scores), masks
        return sum(changed) / sum(m.size for m in masks)

    def record(self, row: dict, k: float) -> None:
        """The epoch's metrics and state into the run, checkpointed; then logged and shown."""
        run, net, t = self.run, self.net, self.cfg.train
        for key, value in row.items():
            run.metrics[key].append(value)
        if net.method.changes_weights:  # dense trains them, IteRand redraws the pruned ones
            run.weights = self.host(net.weights)
        if net.norms:
            run.norms = self.host(net.norm_state())
        run.optimizer = {"name": t.optimizer, "steps": self.opt.steps,
                         "slots": {s: self.host(v) for s, v in self.opt.state.items()}}
        if run.epochs_done == t.epochs:
            run.attrs["status"] = "completed"
        checkpoint(self.run_dir, run)
        if self.log:  # what is logged is what run.h5 holds
            self.log.epoch(row, k, run.mask_change_layers[-1] if net.scores is not None else None)
        self.reporter.epoch_end(row)


def recalibrate(net: Network, w_eff: list, x_train, cfg: Config, epoch: int) -> None:
    """BatchNorm's running statistics from train.bn_recalibration training images under this
    epoch's final mask, in training-size batches, not augmented. The images are drawn from
    (seed, epoch), so a resumed run repeats the choice."""
    t = cfg.train
    pick = np.random.default_rng([cfg.seed, epoch, 3]).permutation(len(x_train))[: t.bn_recalibration]
    idx = net.xp.asarray(pick)
    net.recalibrate(w_eff, (x_train[idx[i : i + t.batch_size]] for i in range(0, len(pick), t.batch_size)))
