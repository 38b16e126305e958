"""Networks as layer lists: the vocabulary of model.layers, and the presets written in it.

A network is a list of layers, each `kind` or `{kind: value}` or `{kind: {param: value, ...}}`:

    linear          units (null: the number of classes), k
    conv            channels, kernel (3), stride (1), padding (null: kernel // 2), k
    batchnorm       affine (false)
    relu
    maxpool         size (2): size x size windows, stride size
    avgpool         size (2)
    global_avg_pool
    flatten
    residual        channels, stride (1), bn (none | nonaffine | affine), k: He et al.'s basic block

`{kind: value}` sets the first parameter (`linear: 120`, `conv: 64`, `maxpool: 2`). `k` is a
weight layer's own fraction of kept weights (1.0: dense), for the top-k methods. Each layer's
input shape follows from the one before: `build` says which layer cannot follow which, with the
shapes. Every preset (model.arch) is such a list: `expand` writes it out, and the resolved spec
of a run holds it, so a preset and a user's network are built by the same code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError
from .layers import AvgPool2d, BatchNorm, Conv2d, Flatten, GlobalAvgPool, Linear, MaxPool2d, ReLU, ResidualBlock, norm_layers, weight_layers

if TYPE_CHECKING:  # annotations only: nn/ does not depend on run/
    from ..run.config import ModelConfig

BN_MODES = ("none", "nonaffine", "affine")


# --- the vocabulary: per kind, how it is built, its parameters with their defaults ---------------


@dataclass(frozen=True)
class Kind:
    make: Callable  # (xp, parameters, input shape, n_classes) -> the layer
    params: dict = field(default_factory=dict)  # name -> default; the first is what `{kind: value}` sets
    needs: str = "any"  # its input: "image" [H, W, C], "vector" [n], or any


KINDS = {
    "linear": Kind(lambda xp, p, s, n: Linear(xp, s[0], n if p["units"] is None else p["units"]), {"units": None, "k": None}, "vector"),
    "conv": Kind(lambda xp, p, s, n: Conv2d(xp, s[2], p["channels"], p["kernel"], p["stride"], p["padding"]),
                 {"channels": None, "kernel": 3, "stride": 1, "padding": None, "k": None}, "image"),
    "batchnorm": Kind(lambda xp, p, s, n: BatchNorm(xp, s[-1], affine=p["affine"]), {"affine": False}),
    "relu": Kind(lambda xp, p, s, n: ReLU(xp)),
    "maxpool": Kind(lambda xp, p, s, n: MaxPool2d(xp, p["size"]), {"size": 2}, "image"),
    "avgpool": Kind(lambda xp, p, s, n: AvgPool2d(xp, p["size"]), {"size": 2}, "image"),
    "global_avg_pool": Kind(lambda xp, p, s, n: GlobalAvgPool(xp), needs="image"),
    "flatten": Kind(lambda xp, p, s, n: Flatten()),
    "residual": Kind(lambda xp, p, s, n: ResidualBlock(xp, s[2], p["channels"], p["stride"], p["bn"]),
                     {"channels": None, "stride": 1, "bn": "none", "k": None}, "image"),
}


def parse(item, where: str) -> tuple[str, dict]:
    """(kind, every parameter) of one entry of a layer list; ConfigError naming `where` otherwise."""
    if isinstance(item, str):
        name, given = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, given = next(iter(item.items()))
        if not isinstance(given, dict):
            first = next(iter(KINDS[name].params), None) if name in KINDS else None
            if first is None and name in KINDS:
                raise ConfigError(f"{where}: {name} takes no parameters, got {given!r}")
            given = {first: given}
    else:
        raise ConfigError(f"{where}: expected a layer (`relu`, `linear: 120` or `conv: {{channels: 32, kernel: 5}}`), got {item!r}")
    if name not in KINDS:
        raise ConfigError(f"{where}: unknown layer {name!r} (known: {', '.join(KINDS)})")
    params = KINDS[name].params
    unknown = [k for k in given if k not in params]
    if unknown:
        known = ", ".join(params) or "none"
        raise ConfigError(f"{where} ({name}): unknown parameter {unknown[0]!r} (known: {known})")
    p = {**params, **given}
    _check_params(name, p, f"{where} ({name})")
    return name, p


def _check_params(name: str, p: dict, where: str) -> None:
    def positive(key, allow_none=False):
        v = p[key]
        if v is None and allow_none:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: {key} expected a positive integer, got {v!r}")

    for key in ("units",):
        if key in p:
            positive(key, allow_none=True)
    for key in ("channels", "kernel", "stride", "size"):
        if key in p:
            positive(key)
    if p.get("padding") is not None and (not isinstance(p["padding"], int) or isinstance(p["padding"], bool) or p["padding"] < 0):
        raise ConfigError(f"{where}: padding expected an integer >= 0 or null, got {p['padding']!r}")
    if "affine" in p and not isinstance(p["affine"], bool):
        raise ConfigError(f"{where}: affine expected true or false, got {p['affine']!r}")
    if "bn" in p and p["bn"] not in BN_MODES:
        raise ConfigError(f"{where}: bn expected one of {', '.join(BN_MODES)}, got {p['bn']!r}")
    k = p.get("k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1):
        raise ConfigError(f"{where}: k expected a fraction in (0, 1] or null, got {k!r}")
    if k is not None:
        p["k"] = float(k)


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def build(xp, layer_list: list, image_shape: tuple, n_classes: int, where: str = "model.layers") -> list:
    """The layer objects of a layer list for inputs of image_shape (H, W, C), ending in n_classes
    outputs; a ConfigError naming the layer, its index and the shapes for one that cannot follow
    the layer before it. Weight layers get their own k (`keep`; None: model.k)."""
    if not isinstance(layer_list, list) or not layer_list:
        raise ConfigError(f"{where}: expected a non-empty list of layers, got {layer_list!r}")
    shape, layers = tuple(image_shape), []
    for i, item in enumerate(layer_list):
        at = f"{where}[{i}]"
        name, p = parse(item, at)
        kind = KINDS[name]
        if kind.needs == "image" and len(shape) != 3:
            raise ConfigError(f"{at} ({name}): needs images [H, W, C], but its input is {_shape_text(shape)} (after a flatten or a linear layer)")
        if kind.needs == "vector" and len(shape) != 1:
            raise ConfigError(f"{at} ({name}): needs a vector, but its input is {_shape_text(shape)}: put a flatten or a global_avg_pool before it")
        if name in ("maxpool", "avgpool") and p["size"] > min(shape[:2]):
            raise ConfigError(f"{at} ({name} {p['size']}x{p['size']}): larger than its input {_shape_text(shape)}")
        if name == "conv":
            pad = p["kernel"] // 2 if p["padding"] is None else p["padding"]
            if min(shape[:2]) + 2 * pad < p["kernel"]:
                raise ConfigError(f"{at} (conv {p['kernel']}x{p['kernel']}, padding {pad}): larger than its padded input {_shape_text(shape)}")
        layer = kind.make(xp, p, shape, n_classes)
        for w in weight_layers([layer]):
            w.keep = p.get("k")  # its own fraction kept (None: model.k)
        shape, _ = layer.output_shape(shape)
        layers.append(layer)
    if shape != (n_classes,):
        raise ConfigError(f"{where}: the network's output is {_shape_text(shape)}, expected [{n_classes}] (the classes of the data): "
                          f"end with a linear layer of {n_classes} units (units: null)")
    return layers


def canonical(layer_list: list, n_classes: int, where: str = "model.layers") -> list:
    """The layer list written out: every parameter given (units: null as the classes), the
    parameterless kinds as plain names; the form a run's resolved spec holds."""
    out = []
    for i, item in enumerate(layer_list):
        name, p = parse(item, f"{where}[{i}]")
        if not p:
            out.append(name)
            continue
        if name == "linear" and p["units"] is None:
            p["units"] = n_classes
        if name == "conv" and p["padding"] is None:
            p["padding"] = p["kernel"] // 2
        if "k" in p and p["k"] is None:
            del p["k"]  # the usual case: model.k
        out.append({name: p})
    return out


# --- the presets, as layer lists ----------------------------------------------------------------


def _scale(cfg: ModelConfig):
    return lambda n: max(1, int(round(n * cfg.width)))


def _linears(widths: list) -> list:
    """Linear layers of these widths (units) with a ReLU between each two; the last: the classes."""
    out = []
    for i, units in enumerate(widths):
        out.append({"linear": {"units": units}})
        if i < len(widths) - 1:
            out.append("relu")
    return out


def _norm(bn: str) -> list:
    return [] if bn == "none" else [{"batchnorm": {"affine": bn == "affine"}}]


class MLP:
    """Fully connected: model.widths gives the inputs, the hidden widths and the classes."""

    family = "mlp"

    def layers(self, cfg: ModelConfig, n_classes: int) -> list:
        return ["flatten", *_linears(list(cfg.widths[1:-1]) + [None])]


@dataclass(frozen=True)
class PlainConvNet:
    """Convs of one kernel size with BatchNorm (model.bn) and ReLU, 'M' = a 2x2 max pool, then
    fully connected layers; model.width scales every channel count and hidden width."""

    kernel: int
    convs: tuple
    hidden: tuple
    family = "conv"

    def layers(self, cfg: ModelConfig, n_classes: int) -> list:
        scale, out = _scale(cfg), []
        for item in self.convs:
            if item == "M":
                out.append({"maxpool": {"size": 2}})
            else:
                out += [{"conv": {"channels": scale(item), "kernel": self.kernel}}, *_norm(cfg.bn), "relu"]
        return out + ["flatten", *_linears([scale(n) for n in self.hidden] + [None])]


@dataclass(frozen=True)
class ResNet:
    """A stem conv, stages of residual blocks (the first of each later stage strided), global
    average pooling and a linear classifier; model.width scales the stages (and the stem where
    `wide_stem`)."""

    stem: int
    stages: tuple
    blocks: int
    wide_stem: bool = True
    family = "resnet"

    def layers(self, cfg: ModelConfig, n_classes: int) -> list:
        scale = _scale(cfg)
        stem = scale(self.stem) if self.wide_stem else self.stem
        out = [{"conv": {"channels": stem, "kernel": 3}}, *_norm(cfg.bn), "relu"]
        for i, width in enumerate(self.stages):
            for j in range(self.blocks):
                out.append({"residual": {"channels": scale(width), "stride": 2 if i > 0 and j == 0 else 1, "bn": cfg.bn}})
        return out + ["global_avg_pool", {"linear": {"units": None}}]


class Custom:
    """model.layers as the user wrote it."""

    family = "custom"

    def layers(self, cfg: ModelConfig, n_classes: int) -> list:
        return list(cfg.layers)


# The presets (model.arch): the VGG-like nets of the lottery-ticket and edge-popup papers (3x3
# convs) and a LeNet-style net (5x5 convs) for MNIST; the CIFAR ResNets of He et al. (6n + 2
# layers, 16-32-64 channels: resnetN for any such N), the CIFAR ResNet-18 (hidden-networks'
# cResNet18), and wide ResNets (Zagoruyko & Komodakis: WRN-d-k, wrnD for d = 6n + 4, n blocks per
# stage of 16k-32k-64k channels, k = model.width; a stem of 16 whatever k).
ARCHITECTURES = {
    "mlp": MLP(),
    "lenet": PlainConvNet(5, (32, "M", 64, "M"), (512,)),
    "conv2": PlainConvNet(3, (64, 64, "M"), (256, 256)),
    "conv4": PlainConvNet(3, (64, 64, "M", 128, 128, "M"), (256, 256)),
    "conv6": PlainConvNet(3, (64, 64, "M", 128, 128, "M", 256, 256, "M"), (256, 256)),
    "conv8": PlainConvNet(3, (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"), (256, 256)),
    "resnet20": ResNet(16, (16, 32, 64), 3),
    "resnet32": ResNet(16, (16, 32, 64), 5),
    "resnet56": ResNet(16, (16, 32, 64), 9),
    "resnet18": ResNet(64, (64, 128, 256, 512), 2),
    "wrn28": ResNet(16, (16, 32, 64), 4, wide_stem=False),
    "custom": Custom(),
}
FAMILIES = "resnetN (N = 6n + 2: 8, 14, 20, ...), wrnN (N = 6n + 4: 10, 16, 22, 28, ...)"


def architecture(name: str):
    """The preset `name`: an entry of ARCHITECTURES, or a depth of the CIFAR ResNet or WRN family."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    m = re.fullmatch(r"(resnet|wrn)(\d+)", name)
    if m:
        family, depth = m.group(1), int(m.group(2))
        rest = depth - (2 if family == "resnet" else 4)
        if rest > 0 and rest % 6 == 0:
            return ResNet(16, (16, 32, 64), rest // 6, wide_stem=family == "resnet")
    raise ConfigError(f"model.arch: expected one of {', '.join(ARCHITECTURES)}, or {FAMILIES}, got {name!r}")


def expand(cfg: ModelConfig, n_classes: int) -> list:
    """The layer list of cfg.arch (a preset) or cfg.layers (custom), written out. (arch null:
    mlp, or custom where layers are given, as config.validate resolves it.)"""
    arch = cfg.arch or ("mlp" if cfg.layers is None else "custom")
    return canonical(architecture(arch).layers(cfg, n_classes), n_classes)


def build_layers(xp, cfg: ModelConfig, image_shape: tuple[int, int, int], n_classes: int) -> list:
    """The layer objects of the spec's network for [N, H, W, C] inputs, its weight layers
    numbered in forward order, BatchNorms likewise."""
    layers = build(xp, expand(cfg, n_classes), image_shape, n_classes)
    for i, layer in enumerate(weight_layers(layers)):
        layer.index = i
    for i, layer in enumerate(norm_layers(layers)):
        layer.number = i
    return layers
