"""What a run needs on its device, made once before training: the dataset as float32 arrays on
the device, the spec's network with its tensors, and the memory budget that refuses a spec that
cannot fit before anything is allocated."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import data as sources
from ..data import datasets as data
from ..data.source import DataInfo
from ..errors import ConfigError, DataError, RunError
from ..kernels.backend import Backend, address_limit
from ..nn.layers import weight_layers
from ..nn.methods import METHODS
from ..nn.model import Network, build_layers, init_network
from .config import Config, check_data


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
    info: DataInfo | None = None  # the image shape and classes
    identity: str = ""  # where the data came from (a built-in's name, a file's path)
    digest: str = ""  # source.content_digest of every array the source gave
    note: str | None = None  # a line for the user before training (a subset that misses classes)


def source(cfg: Config):
    """The spec's data source (data/__init__.py)."""
    d = cfg.data
    return sources.source_for(d.name, d.root, d.path, d.keys, d.image_size)


def data_info(cfg: Config, attrs=None) -> DataInfo:
    """The image shape and classes a run trained on: as run.h5 (or a ticket) records them; a run
    that records none trained on a built-in dataset."""
    info = DataInfo.from_attrs(attrs or {})
    if info is not None:
        return info
    if cfg.data.path is None:
        return data.Builtin(cfg.data.name).info()
    raise RunError(f"data.path {cfg.data.path}: the run records no image shape and classes of its data")


def _limit(n: int | None, have: int, key: str, what: str) -> int | None:
    if n is not None and n > have:
        raise ConfigError(f"{key}: expected at most {have:,} (the {what}), got {n:,}")
    return n


def _missing_classes(y_train, y_test, n_classes: int, d) -> str | None:
    """A note where data.train_samples or data.test_samples keep fewer classes than the data has:
    the first N images of data in class order (an image folder) are a few classes only."""
    for split, y, n in (("train", y_train, d.train_samples), ("test", y_test, d.test_samples)):
        held = len(np.unique(y)) if n is not None else n_classes
        if held < n_classes:
            return (f"note: the first {n:,} {split} images (data.{split}_samples) hold {held} of the {n_classes} classes "
                    "(the data is in class order, as an image folder is: use more, or shuffle the arrays)")
    return None


def load_data(cfg: Config, backend: Backend, mean=None, std=None, src=None) -> DeviceData:
    """Read, standardize and move the dataset to the device, once, as float32 [N, H, W, C].
    `mean`/`std` default to the training set's (a resumed or re-evaluated run passes the ones
    it recorded); `src`: the spec's source, where the caller made it already. The spec is
    checked against the data's shape and classes (config.check_data) before anything else."""
    d = cfg.data
    src = src or source(cfg)
    try:
        ds = src.load()
    except MemoryError:
        raise DataError(f"{d.path or d.name}: the data does not fit in memory") from None
    check_data(cfg, ds.info)
    n_train = _limit(d.train_samples, len(ds.y_train), "data.train_samples", "training images")
    n_test = _limit(d.test_samples, len(ds.y_test), "data.test_samples", "test images")
    x_train, y_train, x_test, y_test = ds.x_train[:n_train], ds.y_train[:n_train], ds.x_test[:n_test], ds.y_test[:n_test]
    x_val = y_val = None
    if ds.x_val is not None:  # the data's own validation split
        if d.val_samples:
            raise ConfigError(f"data.val_samples: the data has its own validation split ({len(ds.y_val):,} images); set it to 0")
        x_val, y_val = ds.x_val, ds.y_val
    elif d.val_samples:  # held out before anything else sees the training images (the standardization too)
        if d.val_samples >= len(y_train):
            raise ConfigError(f"data.val_samples: expected fewer than the {len(y_train):,} training images, got {d.val_samples}")
        train_idx, val_idx = data.validation_split(len(y_train), d.val_samples)
        x_train, y_train, x_val, y_val = x_train[train_idx], y_train[train_idx], x_train[val_idx], y_train[val_idx]
    if cfg.train.bn_recalibration > len(y_train):  # it would recalibrate on fewer images than it says
        raise ConfigError(f"train.bn_recalibration: expected at most the {len(y_train):,} training images, got {cfg.train.bn_recalibration:,}")
    note = _missing_classes(y_train, y_test, ds.info.n_classes, d)
    if mean is None:
        channels = x_train.shape[-1]
        mean, std = data.standardization(x_train) if d.standardize else ([0.0] * channels, [1.0] * channels)
    dev = lambda x: None if x is None else backend.asarray(data.to_float(x, mean, std))  # noqa: E731
    return DeviceData(dev(x_train), backend.asarray(y_train), dev(x_test), backend.asarray(y_test), mean, std,
                      dev(x_val), None if y_val is None else backend.asarray(y_val), ds.info, src.identity, ds.digest, note)


def network(cfg: Config, info: DataInfo, backend: Backend, weights: list, scores: list | None, norms: list | None = None) -> Network:
    """The network of `cfg` for its data's image shape and classes, its tensors (and a stored
    run's BatchNorm statistics) copied onto the device."""
    return Network(backend.xp, cfg.model, weights, scores, info.image_shape, info.n_classes, norms)


def stored_subnetwork(net: Network, masks: list | None) -> list:
    """W_eff of a stored run's network: its stored masks applied (the subnetwork itself, as eval
    and export use it), or where it stores none (dense) the network's own measuring weights."""
    w_eff = net.effective_weights(train=False)
    return w_eff if masks is None else net.subnetwork(masks)


def initial_tensors(cfg: Config, info: DataInfo):
    return init_network(cfg.model, cfg.seed, info.image_shape, info.n_classes)


def memory_needed(cfg: Config, info: DataInfo, n_train: int, n_test: int) -> tuple[int, int, int]:
    """(weights, bytes for the tensors that grow with the network, bytes for the activations of
    the largest batch) of training `cfg` on n_train images and measuring n_test: what it holds at
    once at the least, computed from the layer shapes alone, before anything is allocated."""
    (h, w, c), classes = info.image_shape, info.n_classes
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
    n_weights, tensors, activations = memory_needed(cfg, dd.info, len(dd.y_train), len(dd.y_test))
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
