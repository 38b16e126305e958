"""The Python API, for notebooks and scripts: `scoretrain.fit` trains a run as `scoretrain fit` does
(both start, resume and train a run through run/lifecycle.py) and `scoretrain.open_run` reads one as `eval`, `inspect` and
`export` do, with everything as NumPy arrays.

    import scoretrain
    run = scoretrain.fit("configs/mnist_fc.yaml", model__k=0.3, train__epochs=5, name="k03")
    run = scoretrain.fit({"model": {"widths": [784, 64, 4]}}, data={"x_train": x, "y_train": y, "x_test": xt, "y_test": yt})
    run.predict(images)                # class indices (run.classes names them), as the subnetwork computes them
    run.metrics["test_acc"]            # one value per epoch
    run.layers[0].mask.mean()          # the kept fraction of the first layer
    w_eff = run.subnetwork()           # the effective weights the stored network computes with
    run.evaluate()["test_acc"]         # re-measured on the test split
    scoretrain.resume("runs/k03")      # an interrupted run, on from its last finished epoch

Errors a user can cause are scoretrain.errors.ScoretrainError (ConfigError for a bad spec), with
the one-line message the command prints.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import arrays, datasets
from .data.source import Dataset
from .errors import ConfigError, DataError, ScoretrainError
from .kernels import conv_engine
from .kernels.backend import Backend, resolve
from .run import config as config_mod
from .run import lifecycle, store, train
from .run.resources import data_info, load_data, network, source, stored_subnetwork
from .run.step import evaluate


def _override(key: str, value) -> str:
    """model__k=0.3 (or {"model.k": 0.3}) as the command line's `model.k=0.3`."""
    text = value if isinstance(value, str) else config_mod.yaml_value(value)
    return f"{key.replace('__', '.')}={text}"


def fit(config: str | Path | dict | None = None, overrides: list[str] = (), *, data=None, runs_dir: str | Path = "runs",
        name: str | None = None, quiet: bool = True, **keys) -> RunRecord:
    """Train the spec `config` (a YAML file, a dict of sections, or None for the defaults) with
    `overrides` ("model.k=0.3", as on the command line) and `keys` (model__k=0.3: a double
    underscore for each dot), into runs_dir/name (a generated name by default). `data`: your
    own data in place of the spec's: a path (as data.path), a dict of arrays (x_train, y_train,
    x_test, y_test; x_val, y_val and classes optional) or a scoretrain.data.source.Dataset;
    arrays are kept as an .npz named by their digest in the user cache, which the run's
    data.path names (so eval and resume find them). Returns the finished run. A stopped or
    failed run raises, as `scoretrain fit` exits: its folder keeps its last finished epoch."""
    try:
        raw = _raw_config(config)
        every = [*overrides, *(_override(k, v) for k, v in keys.items())]
        if data is not None:
            every.append(f"data.path={config_mod.yaml_value(str(_data_path(data)))}")
        config_mod.check_once(every)
        for o in every:
            config_mod.apply_override(raw, o)
        session = lifecycle.start(config_mod.from_dict(raw), runs_dir, name)
    except ScoretrainError as e:
        e.args = (_python_names(str(e), keys),)
        raise
    return _train(session, quiet)


def _raw_config(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, Path)):
        return config_mod.read_yaml(Path(config))
    raise ConfigError(f"config: expected a YAML file's path, a dict of sections or None, got {type(config).__name__}")


def _data_path(data) -> Path:
    """The data.path of fit's `data` argument (arrays saved to the cache first)."""
    if isinstance(data, (str, Path)):
        return Path(data).resolve()
    if isinstance(data, dict):
        found = {k: (np.asarray(v) if k != "classes" else list(v)) for k, v in data.items()}
        unknown = sorted(set(found) - set(arrays.KEYS))
        if unknown:
            raise DataError(f"data: unknown key {unknown[0]!r} (known: {', '.join(arrays.KEYS)})")
        data = arrays.dataset_from(found, "data")
    if isinstance(data, Dataset):
        return arrays.save(data, datasets.cache_dir() / "arrays")
    raise DataError(f"data: expected a path, a dict of arrays or a Dataset, got {type(data).__name__}")


def _python_names(message: str, keys: dict) -> str:
    """An error names fit's arguments, not the command line's: a key given as a keyword argument
    (model__k), name and runs_dir for --name and --runs-dir."""
    message = message.replace("--name ", "name ").replace("--runs-dir", "runs_dir")
    for k in keys:
        dotted = k.replace("__", ".")
        if message.startswith(dotted + ":") or message.startswith(dotted + "["):
            return f"{k} ({dotted}){message[len(dotted):]}"
    return message


def resume(run_dir: str | Path, *, quiet: bool = True) -> RunRecord:
    """Go on with an interrupted run from its last finished epoch, as `scoretrain fit --resume`
    does, and return the finished run. A completed run is refused (RunError): its schedule was
    laid out over its epochs; start a new run for more. Data whose digest differs from the
    recorded one is refused (RunError)."""
    return _train(lifecycle.resume(Path(run_dir)), quiet)


def _train(session: lifecycle.Session, quiet: bool) -> RunRecord:
    from rich.console import Console

    from .run.progress import Reporter

    if session.note and not quiet:
        print(session.note, file=sys.stderr)
    lifecycle.train(session, Reporter(Console(file=sys.stdout), quiet))
    return open_run(session.run_dir)


def measure(run_dir: Path, device: str | None = None, other_data: str | Path | None = None) -> dict:
    """Re-measure a stored run (or a ticket, FILE.ticket) on its test split with its stored masks;
    `other_data`: on the test split of other data (a data.path) of the same image shape and
    classes, standardized as the run's own."""
    if Path(run_dir).suffix == ".ticket" and Path(run_dir).is_file():
        return measure_ticket(Path(run_dir), device, other_data)
    run, cfg = store.open_run(run_dir)
    backend = resolve(device or cfg.device)
    src = None
    if other_data is not None:
        cfg, src = _on_other_data(cfg, other_data, data_info(cfg, run.attrs))
    dd = load_data(cfg, backend, run.attrs["input_mean"], run.attrs["input_std"], src)
    if other_data is None:
        lifecycle.check_same_data(run, dd, Path(run_dir))
    net = network(cfg, dd.info, backend, run.weights, run.scores, run.norms)
    train.enter_epoch(net, cfg, max(run.epochs_done - 1, 0))  # the last epoch's k and (supermask) measuring sample
    w_eff = net.effective_weights(train=False)  # masks recomputed from the stored scores
    masks_ok = None
    if run.masks is not None:
        masks_ok = all(bool((backend.to_host(m) == s).all()) for m, s in zip(net.masks, run.masks))
        w_eff = net.subnetwork(run.masks)  # the stored subnetwork itself
    with conv_engine.using(lifecycle.engine(cfg, backend)):  # the convs computed as in training
        loss, acc = evaluate(net, w_eff, dd.x_test, dd.y_test, cfg.train.eval_batch_size)
    recorded = run.metrics["test_acc"][-1] if run.metrics["test_acc"] else None
    if other_data is not None:
        recorded = None  # the record is of the run's own data
    return {
        "run": str(run_dir), "data": dd.identity, "status": store.live_status(run), "method": cfg.model.method,
        "epochs": run.epochs_done, "backend": backend.name, "device": backend.device,
        "test_samples": len(dd.y_test), "test_loss": loss, "test_acc": acc,
        "recorded_test_acc": recorded, "matches_record": None if recorded is None else acc == recorded,
        "masks_match_scores": masks_ok, "config_edited": run.edited, "environments": store.environments(run),
    }


def measure_ticket(path: Path, device: str | None = None, other_data: str | Path | None = None) -> dict:
    """A ticket's subnetwork (its weights regenerated from its seed) on its test split."""
    from .commands import ticket

    t = ticket.read(path)
    cfg, src = (t.spec, None) if other_data is None else _on_other_data(t.spec, other_data, t.data)
    backend = resolve(device or "cpu")
    dd = load_data(cfg, backend, t.input_mean, t.input_std, src)
    if other_data is None and t.data_digest and dd.digest != t.data_digest:
        raise DataError(f"{path}: the data ({dd.identity}) is not what the ticket was found on (its digest differs); restore that data")
    net = network(cfg, dd.info, backend, t.weights, t.scores, t.norms)
    with conv_engine.using(lifecycle.engine(cfg, backend)):
        loss, acc = evaluate(net, net.subnetwork(t.masks), dd.x_test, dd.y_test, cfg.train.eval_batch_size)
    recorded = t.info.get("test_acc") if other_data is None else None
    return {"run": str(path), "data": dd.identity, "status": "ticket", "method": cfg.model.method, "epochs": t.info.get("epochs_done"),
            "backend": backend.name, "device": backend.device, "test_samples": len(dd.y_test), "test_loss": loss,
            "test_acc": acc, "recorded_test_acc": recorded, "matches_record": None if recorded is None else acc == recorded,
            "masks_match_scores": None, "config_edited": None, "environments": []}


def _on_other_data(cfg: config_mod.Config, path: str | Path, recorded) -> tuple[config_mod.Config, object]:
    """The run's spec measuring the whole test split of the data at `path` instead of its own,
    and that data's source; a DataError unless it has the run's image shape and classes."""
    path = Path(path).resolve()
    d = cfg.data
    other = dataclasses.replace(d, name=None, path=str(path), root=None, train_samples=None, test_samples=None, val_samples=0,
                                keys=d.keys if not path.is_dir() else None, image_size=d.image_size if path.is_dir() else None)
    cfg = dataclasses.replace(cfg, data=other)
    src = source(cfg)
    info = src.info()
    if (info.image_shape, info.classes) != (recorded.image_shape, recorded.classes):
        show = lambda i: f"{'x'.join(map(str, i.image_shape))} images of {i.n_classes} classes ({', '.join(i.classes[:4])}{', ...' if i.n_classes > 4 else ''})"  # noqa: E731
        raise DataError(f"{path}: {show(info)}, but the run was trained on {show(recorded)}: --data must have the same image shape and classes")
    return cfg, src


@dataclass
class Layer:
    """One weight layer of a stored run: its frozen weights, and for the score methods its scores
    and the mask of the last finished epoch (None before the first)."""

    kind: str  # "linear" or "conv"
    weight: np.ndarray
    scores: np.ndarray | None
    mask: np.ndarray | None


class RunRecord:
    """A run directory as arrays: what `scoretrain fit` wrote, read once."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)
        self._run, self.spec = store.open_run(self.path)

    @property
    def status(self) -> str:
        """completed, running, interrupted or failed (a dead writer's `running` is interrupted)."""
        return store.live_status(self._run)

    @property
    def epochs_done(self) -> int:
        return self._run.epochs_done

    @property
    def metrics(self) -> dict[str, np.ndarray]:
        """Per-epoch arrays: epoch, lr, train_loss, train_acc, test_loss, test_acc, val_loss, val_acc,
        mask_change, epoch_seconds."""
        return {k: np.asarray(v) for k, v in self._run.metrics.items()}

    @property
    def layers(self) -> list[Layer]:
        r = self._run
        return [Layer("conv" if w.ndim == 4 else "linear", w, None if r.scores is None else r.scores[i],
                      None if r.masks is None else r.masks[i]) for i, w in enumerate(r.weights)]

    @property
    def batchnorm(self) -> list[np.ndarray]:
        """Each BatchNorm's state: [mean, var] ([2, C]), affine ones [mean, var, gamma, beta]."""
        return list(self._run.norms or [])

    @property
    def environments(self) -> list[dict]:
        """What each session that trained the run ran on (environment.describe)."""
        return store.environments(self._run)

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names of the run's data: predict's index i is classes[i]."""
        return data_info(self.spec, self._run.attrs).classes

    def network(self, device: str = "cpu"):
        """The stored network (model.Network) on `device`."""
        return network(self.spec, data_info(self.spec, self._run.attrs), Backend(np, "cpu") if device == "cpu" else resolve(device),
                       self._run.weights, self._run.scores, self._run.norms)

    def logits(self, images, batch_size: int = 1000) -> np.ndarray:
        """The stored subnetwork's logits [N, classes] for images [N, H, W] or [N, H, W, C] in the
        run's data format (uint8 pixels, or floats as its data had), standardized as in training."""
        info = data_info(self.spec, self._run.attrs)
        x = np.asarray(images)
        x = x[..., None] if x.ndim == 3 else x
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(info.image_shape):
            raise DataError(f"images: expected [N, {', '.join(map(str, info.image_shape))}] (the run's image shape), got {list(x.shape)}")
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise DataError(f"images: expected uint8 or float pixels, got {x.dtype}")
        net = self.network()
        w_eff = stored_subnetwork(net, self._run.masks)
        mean, std = self._run.attrs["input_mean"], self._run.attrs["input_std"]
        with conv_engine.using(lifecycle.engine(self.spec, Backend(np, "cpu"))):
            out = [net.logits(datasets.to_float(x[i : i + batch_size], mean, std), w_eff) for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, info.n_classes), np.float32)

    def predict(self, images, batch_size: int = 1000) -> np.ndarray:
        """The class index (into `classes`) the stored subnetwork gives each image."""
        return self.logits(images, batch_size).argmax(axis=1)

    def subnetwork(self) -> list[np.ndarray]:
        """The effective weights the stored network computes with, per weight layer (edge-popup:
        W * mask; biprop: alpha * sign(W) * mask; dense: W), as `export` writes them."""
        return [np.array(w) for w in stored_subnetwork(self.network(), self._run.masks)]

    def evaluate(self, device: str | None = None) -> dict:
        """`scoretrain eval`'s figures: the stored subnetwork re-measured on the test split."""
        return measure(self.path, device)

    def __repr__(self) -> str:
        m = self.spec.model
        acc = self._run.metrics["test_acc"]
        return (f"RunRecord({str(self.path)!r}: {m.method} {m.arch}, {self.status}, {self.epochs_done} epochs"
                f"{f', test acc {100 * acc[-1]:.2f}%' if acc else ''})")


def open_ticket(path: str | Path):
    """A ticket (export --to FILE.ticket), its frozen weights regenerated from its seed and checked
    against its digest: ticket.Ticket (.spec, .weights, .masks, .norms, .info). measure(path)
    evaluates it."""
    from .commands import ticket

    return ticket.read(Path(path))


def open_run(run_dir: str | Path) -> RunRecord:
    """A run directory, read: its spec, metrics, layers (weights, scores, masks), BatchNorm state.
    RunError if it is not a readable scoretrain run."""
    return RunRecord(run_dir)
