"""Every key of the spec takes effect or is refused: walked over every method and every kind of
network. For each key a value other than the base's is tried on each base spec; the run it
trains must differ from the base's (its weights, scores, masks, metrics or files), or the spec
must be refused in one line. So a run's record never holds a setting that changed nothing."""

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from rich.console import Console

from conftest import arrays_digest, merged

from scoretrain.data import datasets
from scoretrain.errors import ScoretrainError
from scoretrain.run import config, lifecycle
from scoretrain.run.progress import Reporter

# Keys that say where or how a run computes, not what: they are recorded as set and change no
# result by design (the test checks that the list names only real keys).
OPERATIONAL = {
    "device": "where to train; the same run on another backend is checked by the GPU tests",
    "train.eval_batch_size": "how many test images are measured at once: memory, not results",
    "train.cuda_graph": "replays a GPU step as a CUDA graph, bit for bit the eager step (tests/test_graph.py)",
    "train.conv_engine": "which library computes the convolutions: the same results within 1e-5 (tests/test_conv_engine.py)",
}

# Keys whose effect needs data these bases do not use (a built-in dataset, a folder of images):
# here they are refused on every base, their effect is tested where that data is.
EFFECT_ELSEWHERE = {
    "data.name": "another built-in dataset: tests/test_download.py, tests/test_cifar.py",
    "data.root": "the files of a built-in dataset from another folder: tests/test_download.py",
    "data.image_size": "a folder of images resized: tests/test_folders.py",
}

LAYERS = "[{conv: 4}, relu, {maxpool: 2}, flatten, {linear: 16}, relu, linear]"
BASES = {
    "mlp edge-popup": [],
    "mlp dense": ["model.method=dense"],
    "mlp supermask adam": ["model.method=supermask", "train.optimizer=adam"],
    "mlp biprop step": ["model.method=biprop", "train.schedule=step", "train.step_size=1"],
    "mlp iterand": ["model.method=iterand", "model.rerand_freq=2"],
    "lenet": ["model.arch=lenet", "model.width=0.125"],
    "resnet8": ["model.arch=resnet8", "model.width=0.25", "model.bn=nonaffine"],
    "custom": [f"model.layers={LAYERS}"],
}


def other_choice(key):
    return lambda cfg: next(c for c in _field(key).metadata["choices"] if c != _value(cfg, key))


# A value other than the base's, per key (a function of the base spec where it depends on it).
ALTERNATIVES = {
    "seed": 1,
    "data.name": "mnist",
    "data.path": lambda cfg: str(Path(cfg.data.path).with_name("other.npz")),
    "data.keys": "{x_train: x_more, y_train: y_more}",
    "data.image_size": 14,
    "data.root": "/tmp",
    "data.standardize": False,
    "data.train_samples": 48,
    "data.test_samples": 16,
    "data.val_samples": 8,
    "data.crop_padding": 2,
    "data.flip": True,
    "model.method": other_choice("model.method"),
    "model.arch": lambda cfg: {"lenet": "conv2", "resnet8": "resnet14"}.get(cfg.model.arch, "lenet"),
    "model.layers": "[flatten, {linear: 32}, relu, linear]",
    "model.widths": [784, 16, 10],
    "model.width": 0.5,
    "model.bn": other_choice("model.bn"),
    "model.k": 0.3,
    "model.k_scope": "global",
    "model.k_warmup_epochs": 2,
    "model.rerand_freq": 1,
    "model.rerand_rate": 0.5,
    "model.init": "kaiming_normal",
    "model.scale_fan": True,
    "model.score_init": "kaiming_normal",
    "model.dense_first": True,
    "model.dense_last": True,
    "model.score_granularity": "kernel",
    "train.epochs": 3,
    "train.batch_size": 32,
    "train.optimizer": other_choice("train.optimizer"),
    "train.lr": 0.05,
    "train.momentum": 0.5,
    "train.nesterov": True,
    "train.betas": [0.8, 0.99],
    "train.weight_decay": 0.01,
    "train.schedule": other_choice("train.schedule"),
    "train.warmup_epochs": 2,
    "train.step_size": 2,
    "train.gamma": 0.5,
    "train.tensorboard": True,
    "train.bn_recalibration": 16,
}


def _field(key):
    prefix, _, name = key.rpartition(".")
    cls = dict(config.sections())[prefix + "." if prefix else ""]
    return next(f for f in config.section_keys(cls) if f.name == name)


def _value(cfg, key):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def all_keys():
    return [prefix + f.name for prefix, cls in config.sections() for f in config.section_keys(cls)]


def train(overrides, runs_dir, name=None) -> Path:
    """A run through the lifecycle `fit` uses (without reading it back as the API does)."""
    session = lifecycle.start(config.load(None, overrides), runs_dir, name)
    lifecycle.train(session, Reporter(Console(file=io.StringIO()), quiet=True))
    return session.run_dir


def fingerprint(run_dir: Path) -> str:
    """What a run computed and wrote: every array of run.h5 but the timings and the environment
    (the spec, which records the key itself, is an attribute), and the names of its files."""
    files = " ".join(sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name != "run.h5"))
    return hashlib.sha256(f"{arrays_digest(run_dir)} {files}".encode()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """64 MNIST training and 32 test images as an .npz (with two more arrays for data.keys), and
    other images of the same kind (for data.path)."""
    folder = tmp_path_factory.mktemp("every-key")
    ds = datasets.load("mnist")
    np.savez(folder / "tiny.npz", x_train=ds.x_train[:64], y_train=ds.y_train[:64], x_test=ds.x_test[:32], y_test=ds.y_test[:32],
             x_more=ds.x_train[64:128], y_more=ds.y_train[64:128])
    np.savez(folder / "other.npz", x_train=ds.x_train[128:192], y_train=ds.y_train[128:192], x_test=ds.x_test[:32], y_test=ds.y_test[:32])
    return folder


def overrides_of(tiny, base):
    common = ["data.name=null", f"data.path={tiny / 'tiny.npz'}", "train.epochs=2", "train.batch_size=16", "device=cpu"]
    small = [] if any(o.startswith(("model.arch=", "model.layers=")) for o in BASES[base]) else ["model.widths=[784,32,10]"]
    return common + small + BASES[base]


def test_every_key_is_walked_or_named_operational():
    keys = set(all_keys())
    assert set(OPERATIONAL) <= keys, set(OPERATIONAL) - keys
    assert keys - set(OPERATIONAL) == set(ALTERNATIVES), (keys - set(OPERATIONAL)) ^ set(ALTERNATIVES)


def test_every_key_takes_effect_or_is_refused_on_every_method_and_network(tiny, tmp_path):
    base_prints, took_effect, problems = {}, {}, []
    for base in BASES:
        base_prints[base] = fingerprint(train(overrides_of(tiny, base), tmp_path, f"base-{base.replace(' ', '-')}"))
    for key, alternative in ALTERNATIVES.items():
        for base in BASES:
            cfg = config.load(None, overrides_of(tiny, base))
            value = alternative(cfg) if callable(alternative) else alternative
            text = value if isinstance(value, str) else config.yaml_value(value)
            if text == config.yaml_value(_value(cfg, key)):
                continue  # the base has this value already
            try:
                run_dir = train(merged(overrides_of(tiny, base), [f"{key}={text}"]), tmp_path / key / base.replace(" ", "-"))
            except ScoretrainError as e:
                assert "\n" not in str(e) and str(e), (key, base, str(e))  # refused: one line
                continue
            if fingerprint(run_dir) == base_prints[base]:
                problems.append(f"{key}={text} on {base}: accepted, and the run is the base's")
            took_effect.setdefault(key, []).append(base)
    assert not problems, "\n".join(problems)
    never = sorted(set(ALTERNATIVES) - set(took_effect) - set(EFFECT_ELSEWHERE))
    assert not never, f"refused on every base (the walk proves nothing for them): {never}"
