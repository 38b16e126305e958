"""The experiment spec: typed sections, YAML loading, dotted overrides, validation.

Every key has a default here, so the resolved spec written into a run directory
is complete. Errors are one line naming the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..nn import methods
from ..data.datasets import DATASETS as BUILTIN
from ..data.datasets import Builtin
from ..data.source import DataInfo
from ..nn.architectures import ARCHITECTURES, architecture, build, expand
from ..nn.layers import norm_layers, weight_layers
from ..errors import ConfigError
from ..kernels import conv_engine

METHODS = tuple(methods.METHODS)  # the registry's names: a method is a class in methods.py
K_METHODS = methods.K_METHODS  # the methods that keep a fixed fraction k of the weights
ARCHS = tuple(ARCHITECTURES)  # the registry's names (and the resnetN / wrnN depths): nn/architectures.py
BN = ("none", "nonaffine", "affine")
K_SCOPES = ("layer", "global")
INITS = ("signed_constant", "kaiming_normal", "kaiming_uniform")
SCORE_INITS = ("kaiming_uniform", "kaiming_normal")
GRANULARITIES = ("weight", "kernel", "filter")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant", "step")
CONV_ENGINES = conv_engine.CHOICES  # kernels/conv_engine.py
DATASETS = tuple(BUILTIN)  # the built-in datasets: a source each in data/datasets.py


def key(default, help: str, choices: tuple = ()):
    """A spec key: its default, what it does (the reference in docs/spec.md is generated from
    it) and, where validate() takes a fixed set of values, those values."""
    metadata = {"help": help, "choices": tuple(choices)}
    if isinstance(default, list):  # a mutable default needs a factory: every Config gets its own list
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """The dataset, how many of its images are used, and the augmentation of the training images."""

    name: str | None = key(None, "a built-in dataset: 28x28 grayscale (mnist, fashion-mnist, kmnist) or 32x32 colour (cifar10, cifar100, svhn); null: mnist, or the data of data.path", DATASETS)
    path: str | None = key(None, "your own data: an .npz or HDF5 file holding x_train, y_train, x_test, y_test (x_val, y_val optional), or a folder DIR/train/<class>/*, DIR/test/<class>/* of images; see docs/data.md")
    keys: dict[str, str] | None = key(None, "data.path file: its own names for x_train, y_train, x_test, y_test, x_val, y_val or classes, e.g. {x_train: images}")
    image_size: int | None = key(None, "data.path folder: resize every image to N x N pixels (bilinear); null: the images' own size, which must be one")
    root: str | None = key(None, "built-in datasets: folder holding `<name>/` with the dataset's files, never downloaded into; null: the repo's data/, then the user cache, else a download into the cache")
    standardize: bool = key(True, "scale the pixels to [0, 1], then subtract the training images' mean and divide by their std, per channel; false: only the scaling")
    train_samples: int | None = key(None, "use only the first N training images; null: all")
    test_samples: int | None = key(None, "use only the first N test images; null: all")
    val_samples: int = key(0, "hold out N training images as a validation split, measured every epoch and never trained on (the same images whatever the seed); 0: none")
    crop_padding: int = key(0, "augmentation: pad each training image with N zero pixels per side, then crop a random window of the original size; 0: off")
    flip: bool = key(False, "augmentation: mirror each training image left-right with probability 1/2")


@dataclass
class ModelConfig:
    """The network: what is learned, the architecture, the fraction k of the weights kept, and the inits."""

    method: str = key("edge-popup", "what is learned: scores that choose a subnetwork of frozen random weights (edge-popup; biprop: over binary weights; supermask: a sampled mask; iterand: edge-popup that redraws pruned weights), or the weights themselves (dense); see docs/methods.md", METHODS)
    arch: str | None = key(None, "the network: an mlp with the layer widths of `widths`, a conv net (lenet, conv2 ... conv8), a residual net (resnet18, resnetN for N = 6n + 2, wrnN for N = 6n + 4), or custom: the layers of `layers`; null: mlp, or custom where `layers` is given", ARCHS)
    layers: list | None = key(None, "the network as a list of layers (custom), e.g. [flatten, {linear: 300}, relu, linear]; for a preset the run's resolved spec holds its list written out; see docs/spec.md#layers")
    widths: list[int] = key([784, 250, 250, 10], "mlp only: the number of inputs, the hidden widths, the number of classes")
    width: float = key(1.0, "conv and residual presets: multiplier of every channel count and hidden width (rounded, at least 1); wrnN: its widening factor k")
    bn: str = key("none", "conv and residual presets: batch normalization after every conv (affine: with a learned scale and shift per channel)", BN)
    k: float = key(0.5, "fraction of the weights kept, round(k * n), by the top-k methods (edge-popup, biprop, iterand); also the fan factor of scale_fan")
    k_scope: str = key("layer", "layer: keep k of each layer (the paper); global: k of the whole network, one top-k over all scores", K_SCOPES)
    k_warmup_epochs: int = key(0, "top-k methods: k falls geometrically from 1 to k over the first N epochs (epoch e keeps k ** ((e + 1) / N)); 0: k from the start")
    rerand_freq: int = key(300, "iterand: redraw pruned weights every N optimizer steps")
    rerand_rate: float = key(0.1, "iterand: the probability with which each pruned weight is redrawn from the init")
    init: str = key("signed_constant", "the random weights: signed_constant (+-std), kaiming_normal or kaiming_uniform, with std = sqrt(2 / fan_in)", INITS)
    scale_fan: bool = key(False, "use k * fan_in as the fan of the weight init (the paper's scaled inits)")
    score_init: str = key("kaiming_uniform", "the initial scores: kaiming_uniform, U(+-1/sqrt(fan_in)) as the reference code, or kaiming_normal, N(0, 2/fan_in)", SCORE_INITS)
    dense_first: bool = key(False, "top-k methods: the first weight layer keeps all its random weights")
    dense_last: bool = key(False, "top-k methods: the last weight layer keeps all its random weights")
    score_granularity: str = key("weight", "top-k methods: one score per weight, per kernel (a conv's (out, in) kernel) or per filter (an output filter or unit); the top-k keeps whole units", GRANULARITIES)


@dataclass
class TrainConfig:
    """The optimizer, the learning-rate schedule, and how the epochs are run and measured."""

    epochs: int = key(20, "number of passes over the training images")
    batch_size: int = key(128, "training batch size; the images are shuffled every epoch and the last, smaller batch is kept")
    optimizer: str = key("sgd", "the update rule, as PyTorch's", OPTIMIZERS)
    lr: float = key(0.1, "the learning rate that the warm-up and the schedule start from")
    momentum: float = key(0.9, "sgd: momentum in [0, 1) (0: plain SGD)")
    nesterov: bool = key(False, "sgd: Nesterov momentum")
    betas: list[float] = key([0.9, 0.999], "adam: the decay rates of the two moment averages, each in [0, 1) (eps is 1e-8)")
    weight_decay: float = key(5e-4, "L2 added to the gradient of the learned tensor (the scores; the weights for dense)")
    schedule: str = key("cosine", "the per-epoch learning rate after the warm-up: cosine from lr towards 0, constant, or step (times gamma every step_size epochs)", SCHEDULES)
    warmup_epochs: int = key(0, "linear warm-up before the schedule: epoch e < N uses lr * (e + 1) / N; 0: none")
    step_size: int = key(10, "step schedule: epochs between decays")
    gamma: float = key(0.1, "step schedule: the decay factor, in (0, 1]")
    eval_batch_size: int = key(1000, "batch size for measuring the test and validation splits; lower it where one layer's activations do not fit")
    cuda_graph: bool = key(True, "on a GPU, replay the training step as CUDA graphs where the method and optimizer allow; no effect on the CPU")
    tensorboard: bool = key(False, "write each epoch's scalars as TensorBoard events to RUN_DIR/tensorboard (needs tensorboardX)")
    bn_recalibration: int = key(0, "recompute BatchNorm's running statistics from N training images before each epoch's measurement; 0: keep the moving averages")
    conv_engine: str = key("auto", "what computes the convolutions: im2col (the reference: patches and a GEMM; BatchNorm's sums in row order, the reference's bits), torch (PyTorch's oneDNN kernels on the CPU, cuDNN on a GPU, BatchNorm's sums over spans of 64 values; the extra scoretrain[torch]) or auto (torch on the CPU where it is installed, else im2col); see docs/performance.md", CONV_ENGINES)


@dataclass
class Config:
    """The run's seed and device; the sections data, model and train hold the rest."""

    seed: int = key(0, "integer >= 0 that fixes everything random: weights, scores, data order, augmentation and sampled masks")
    device: str = key("auto", "where to train: auto (GPU 0 if CuPy can use it, else the CPU), cpu, gpu or gpu:N")
    data: DataConfig = field(default_factory=DataConfig)  # a section: described by its docstring
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- building a Config from plain data -------------------------------------------------


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
    args = typing.get_args(tp)
    if typing.get_origin(tp) is dict:
        return "a mapping"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return f"{_type_name(inner)} or null"
    return names.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; return it converted (int -> float, '5e-4' -> float)."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        try:
            return _coerce(value, inner, key)
        except ConfigError:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}") from None
    if tp is list:  # a list checked by its own validation (model.layers)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string; also 'inf', '1e999'
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(number)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:  # stored in run.h5 and used by NumPy as int64
                raise ConfigError(f"{key}: expected an integer that fits in 64 bits, got {value!r}")
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{dotted}: unknown key{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _check(ok: bool, key: str, expected: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _choice(key: str, value, choices) -> None:
    _check(value in choices, key, "one of " + ", ".join(choices), value)


def validate(cfg: Config) -> Config:
    """Check every key, fill in the choices null leaves to the spec (data.name, model.arch) and,
    for a built-in dataset, check the spec against its shape and classes (check_data): a spec of
    a data.path source is checked against its data once that is read."""
    d, m, t = cfg.data, cfg.model, cfg.train
    _check(d.name is None or d.path is None, "data.name", "null with data.path (name: a built-in dataset; path: your own data): set data.name=null", d.name)
    if d.path is None:
        d.name = d.name or "mnist"
        _choice("data.name", d.name, DATASETS)
    else:  # recorded as an absolute path: a run's spec names its data wherever it is read from
        d.path = str(Path(d.path).expanduser().absolute())
    _check(d.image_size is None or d.image_size > 0, "data.image_size", "a positive integer or null", d.image_size)
    if m.arch is None:
        m.arch = "mlp" if m.layers is None else "custom"
    architecture(m.arch)  # a ConfigError for a name that is neither a preset nor a family's depth
    _check(m.arch != "custom" or m.layers is not None, "model.arch", "a preset where model.layers is null (custom builds model.layers)", m.arch)
    for key in ("train_samples", "test_samples"):
        v = getattr(d, key)
        _check(v is None or v > 0, f"data.{key}", "a positive integer or null", v)
    _check(d.val_samples >= 0, "data.val_samples", "an integer >= 0", d.val_samples)
    _check(d.train_samples is None or d.val_samples < d.train_samples, "data.val_samples",
           f"fewer than data.train_samples ({d.train_samples})", d.val_samples)
    _choice("model.method", m.method, METHODS)
    _choice("model.bn", m.bn, BN)
    _choice("model.k_scope", m.k_scope, K_SCOPES)
    _check(m.width > 0, "model.width", "a positive number", m.width)
    _choice("model.init", m.init, INITS)
    _choice("model.score_init", m.score_init, SCORE_INITS)
    _choice("model.score_granularity", m.score_granularity, GRANULARITIES)
    # the keys of the top-k methods, and what they must be for the others
    for key, off in (("score_granularity", "weight"), ("dense_first", False), ("dense_last", False), ("k_warmup_epochs", 0)):
        shown = str(off).lower() if isinstance(off, bool) else off  # as YAML writes it
        _check(getattr(m, key) == off or m.method in K_METHODS, f"model.{key}",
               f"{shown} for {m.method} (only {', '.join(K_METHODS)} keep a fraction k)", getattr(m, key))
    _check(0.0 < m.k <= 1.0, "model.k", "a fraction in (0, 1]", m.k)
    # settings that cannot work: a last layer pruned by whole output units (classes), nothing left to learn
    _check(m.score_granularity != "filter" or m.dense_last or m.k == 1, "model.score_granularity",
           "weight or kernel, or filter with model.dense_last: true (the last layer's units are the classes: "
           "one score per unit would prune whole classes)", m.score_granularity)
    if m.arch == "mlp" and (m.dense_first or m.dense_last) and m.dense_first + m.dense_last >= len(m.widths) - 1:
        raise ConfigError(f"model.dense_first, model.dense_last: an mlp of {len(m.widths) - 1} weight layer"
                          f"{'' if len(m.widths) == 2 else 's'} keeps them all dense, leaving no scores to learn; "
                          "add a hidden layer to model.widths, or use model.method: dense")
    _check(d.train_samples is None or t.bn_recalibration <= d.train_samples - d.val_samples, "train.bn_recalibration",
           f"at most the {(d.train_samples or 0) - d.val_samples} training images (data.train_samples less data.val_samples)",
           t.bn_recalibration)
    _check(m.rerand_freq > 0, "model.rerand_freq", "a positive integer", m.rerand_freq)
    _check(0 < m.rerand_rate <= 1, "model.rerand_rate", "a probability in (0, 1]", m.rerand_rate)
    _check(m.k_warmup_epochs >= 0, "model.k_warmup_epochs", "an integer >= 0", m.k_warmup_epochs)
    # one warm-up epoch would keep k from the start (epoch 1 keeps k ** (1 / 1)): no warm-up at all
    _check(m.k_warmup_epochs != 1, "model.k_warmup_epochs", "0 (none) or at least 2 (one epoch of warm-up already keeps k)", m.k_warmup_epochs)
    _check(m.k_warmup_epochs <= t.epochs, "model.k_warmup_epochs", f"at most train.epochs ({t.epochs}), so that the run reaches k", m.k_warmup_epochs)
    _check(len(m.widths) >= 2, "model.widths", "at least two widths (inputs and classes)", m.widths)
    _check(all(w > 0 for w in m.widths), "model.widths", "positive integers", m.widths)
    _check(d.crop_padding >= 0, "data.crop_padding", "an integer >= 0", d.crop_padding)
    for key in ("epochs", "batch_size", "eval_batch_size", "step_size"):
        _check(getattr(t, key) > 0, f"train.{key}", "a positive integer", getattr(t, key))
    _check(t.bn_recalibration >= 0, "train.bn_recalibration", "an integer >= 0", t.bn_recalibration)
    _check(t.lr > 0, "train.lr", "a positive number", t.lr)
    _check(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    _check(0 <= t.momentum < 1, "train.momentum", "a number in [0, 1)", t.momentum)
    _check(0 < t.gamma <= 1, "train.gamma", "a number in (0, 1]", t.gamma)
    _check(t.warmup_epochs >= 0, "train.warmup_epochs", "an integer >= 0", t.warmup_epochs)
    # one warm-up epoch runs at lr * 1 / 1, the full rate: no warm-up at all
    _check(t.warmup_epochs != 1, "train.warmup_epochs", "0 (none) or at least 2 (one epoch of warm-up already runs at lr)", t.warmup_epochs)
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "two numbers in [0, 1)", t.betas)
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _choice("train.schedule", t.schedule, SCHEDULES)
    _choice("train.conv_engine", t.conv_engine, CONV_ENGINES)
    dev = cfg.device
    ok = dev in ("auto", "cpu", "gpu") or (dev.startswith("gpu:") and dev[4:].isdigit())
    _check(ok, "device", "auto, cpu, gpu or gpu:N", dev)
    _check(cfg.seed >= 0, "seed", "an integer >= 0", cfg.seed)
    check_applies(cfg)
    if d.path is None:
        check_data(cfg, Builtin(d.name).info())
    return cfg


# Every key that applies only to some specs: (dotted key, whether it applies, to what). A value
# other than the default where it does not apply is refused, so a run's record never holds a
# setting that had no effect. (The keys of the top-k methods are checked in validate.)
APPLIES = [
    ("data.root", lambda c: c.data.path is None, "the built-in datasets (data.name), not data.path"),
    ("data.keys", lambda c: c.data.path is not None, "a data.path file"),
    ("data.image_size", lambda c: c.data.path is not None, "a data.path folder of images"),
    ("model.widths", lambda c: c.model.arch == "mlp", "model.arch: mlp (the layers of custom are model.layers)"),
    ("model.width", lambda c: architecture(c.model.arch).family in ("conv", "resnet"), "the conv and residual presets (lenet, conv2-8, resnetN, wrnN)"),
    ("model.bn", lambda c: architecture(c.model.arch).family in ("conv", "resnet"), "the conv and residual presets (in model.layers: batchnorm, residual's bn)"),
    ("model.k", lambda c: c.model.method in K_METHODS or c.model.scale_fan, f"the top-k methods ({', '.join(K_METHODS)}) and model.scale_fan"),
    ("model.k_scope", lambda c: c.model.method in K_METHODS, f"the top-k methods ({', '.join(K_METHODS)})"),
    ("model.rerand_freq", lambda c: c.model.method == "iterand", "model.method: iterand"),
    ("model.rerand_rate", lambda c: c.model.method == "iterand", "model.method: iterand"),
    ("model.score_init", lambda c: METHODS_LEARN[c.model.method] == "scores", "the methods that learn scores (not dense)"),
    ("train.momentum", lambda c: c.train.optimizer == "sgd", "train.optimizer: sgd"),
    ("train.nesterov", lambda c: c.train.optimizer == "sgd" and c.train.momentum > 0, "train.optimizer: sgd with train.momentum > 0"),
    ("train.betas", lambda c: c.train.optimizer == "adam", "train.optimizer: adam"),
    ("train.step_size", lambda c: c.train.schedule == "step", "train.schedule: step"),
    ("train.gamma", lambda c: c.train.schedule == "step", "train.schedule: step"),
]
METHODS_LEARN = {name: m.learns for name, m in methods.METHODS.items()}


def _default(dotted: str):
    section, name = dotted.split(".")
    f = next(f for f in dataclasses.fields(Config().__getattribute__(section)) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def check_applies(cfg: Config) -> None:
    for dotted, applies, to in APPLIES:
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != _default(dotted) and not applies(cfg):
            shown = yaml_value(value)
            raise ConfigError(f"{dotted}: {shown} has no effect here: it applies to {to}; remove it")


def check_data(cfg: Config, info: DataInfo) -> Config:
    """The checks that need the data's image shape and classes, and the network written out:
    model.layers of the resolved spec holds the layer list (a preset's expanded, a custom one in
    full), so the record says exactly what was built."""
    d, m, t = cfg.data, cfg.model, cfg.train
    h, w, c = info.image_shape
    where = d.name or d.path
    # more padding than the image is wide would crop mostly padding (and pad every batch to a huge array)
    _check(d.crop_padding <= min(h, w), "data.crop_padding", f"an integer in [0, {min(h, w)}] (at most the image size of {where})", d.crop_padding)
    _check(m.arch != "mlp" or m.widths[0] == h * w * c, "model.widths[0]", f"{h * w * c} (the inputs of {where})", m.widths[0])
    _check(m.arch != "mlp" or m.widths[-1] == info.n_classes, "model.widths[-1]", f"{info.n_classes} (the classes of {where})", m.widths[-1])
    layers = expand(m, info.n_classes)
    if m.arch != "custom" and m.layers is not None and m.layers != layers:
        raise ConfigError(f"model.layers: differs from the layers of model.arch {m.arch} (set model.arch: custom to build your own list)")
    built = build(np, layers, info.image_shape, info.n_classes)
    weighted = weight_layers(built)
    own_k = [l.keep for l in weighted if l.keep is not None]
    _check(not own_k or m.method in K_METHODS, "model.layers", f"no layer's own k for {m.method} (only {', '.join(K_METHODS)} keep a fraction k)", own_k)
    _check(not own_k or m.k_scope == "layer", "model.layers", "no layer's own k with model.k_scope: global (one top-k over all scores)", own_k)
    _check(t.bn_recalibration == 0 or norm_layers(built), "train.bn_recalibration", "0 for a network without BatchNorm (there is nothing to recalibrate)", t.bn_recalibration)
    # a linear layer's kernels are its weights: per-kernel scores need a conv
    convs = [l for l in weighted if len(l.shape) == 4]
    _check(m.score_granularity != "kernel" or convs, "model.score_granularity", "weight or filter for a network without convs (a linear layer's kernels are its weights)", m.score_granularity)
    m.layers = layers
    return cfg


def from_dict(raw: dict) -> Config:
    if isinstance(raw, dict) and "sweep" in raw:
        raise ConfigError("sweep: this file declares a grid of runs: train it with `scoretrain sweep FILE` (fit trains one run)")
    return validate(_build(Config, raw, ""))


# --- YAML files and overrides ---------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """safe_load, refusing a key given twice in one mapping (PyYAML lets the last one win)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str):
    """yaml.safe_load, strict about duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e.__class__.__name__}: {e})") from None
    return yaml_mapping(text, str(path))


def yaml_mapping(text: str, where: str) -> dict:
    """The mapping of sections in a YAML text; ConfigError (naming `where`) for anything else."""
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        kind = "" if problem.startswith("duplicate key") else "YAML syntax error: "
        raise ConfigError(f"{at}: {kind}{problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (data, model, train, ...), got {type(raw).__name__}")
    return raw


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in the nested dict `raw`; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override '{override}': expected key=value, e.g. model.k=0.3")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{override}': expected a dotted key like train.lr")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or ""
        what = problem if problem.startswith("duplicate key") else "the value is not valid YAML"
        raise ConfigError(f"override '{override}': {what}") from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def check_once(overrides: typing.Sequence[str]) -> None:
    """A ConfigError for a key given twice among the overrides: which one was meant is not clear."""
    seen = {}
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if "=" in o and key in seen:
            raise ConfigError(f"{key}: given twice ({seen[key]}, then {o}): give each key once")
        seen[key] = o


def load(path: Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    check_once(overrides)
    raw = read_yaml(path) if path is not None else {}
    for o in overrides:
        apply_override(raw, o)
    try:
        return from_dict(raw)
    except ConfigError as e:
        src = f"{path}: " if path is not None else ""
        raise ConfigError(f"{src}{e}") from None


def load_written(path: Path) -> Config:
    """A run's config.yaml, as a person may have edited it: for a preset, the layer list written
    out beside model.arch is derived from model.arch's keys and is derived again (an edited
    model.widths is then what differs from the run, not the list)."""
    raw = read_yaml(path)
    model = raw.get("model")
    if isinstance(model, dict) and model.get("arch") not in (None, "custom"):
        model.pop("layers", None)
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def from_text(text: str, where: str) -> Config:
    """A Config from the YAML text of a resolved spec (the copy a run keeps in run.h5)."""
    try:
        return from_dict(yaml_mapping(text, where))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if not str(e).startswith(where) else str(e)) from None


def differences(a: Config, b: Config, sections=None) -> list[tuple[str, object, object]]:
    """(dotted key, a's value, b's value) for every key where two specs differ; `sections`
    limits the comparison to those top-level keys."""
    out = []

    derived = a.model.arch != "custom" or b.model.arch != "custom"  # a preset's list follows its keys

    def walk(x, y, prefix):
        for key in x:
            if prefix == "" and sections is not None and key not in sections:
                continue
            if derived and prefix + key == "model.layers":
                continue
            if isinstance(x[key], dict):
                walk(x[key], y[key], f"{prefix}{key}.")
            elif x[key] != y[key]:
                out.append((prefix + key, x[key], y[key]))

    walk(a.to_dict(), b.to_dict(), "")
    return out


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def show(cfg: Config) -> str:
    """The resolved spec as YAML: exactly the config.yaml a run of it writes, so what is shown is
    what would be recorded (and it loads back to the same Config)."""
    return dump(cfg)


# --- the reference page (docs/spec.md) -------------------------------------------------------


def sections() -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) of the top level and of every section, in the spec's order."""
    nested = [(f.name + ".", f.default_factory) for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]
    return [("", Config), *nested]


def section_keys(cls) -> list[dataclasses.Field]:
    """A section's keys: the fields made by key(), not the sections nested in it."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def yaml_value(value) -> str:
    """A value as YAML writes it in one line (null, true, 0.3, [784, 250, 250, 10]): a default on
    the reference page, an API keyword as a command-line override."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare pipe would end the table cell


def reference_markdown() -> str:
    """The spec reference: per section its description and a table of its keys' types, defaults and meanings."""
    out = []
    for prefix, cls in sections():
        title = f"`{prefix.rstrip('.')}`" if prefix else "Top level"
        out += [f"### {title}", "", inspect.cleandoc(cls.__doc__), "",
                "| key | type | default | what it does |", "| --- | --- | --- | --- |"]
        for f in section_keys(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata["choices"]
            kind = f"`{f.type}`" + (": " + ", ".join(f"`{c}`" for c in choices) if choices else "")
            out.append(f"| `{prefix}{f.name}` | {_cell(kind)} | `{yaml_value(default)}` | {_cell(f.metadata['help'])} |")
        out.append("")
    return "\n".join(out)
