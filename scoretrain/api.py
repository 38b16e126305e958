"""The Python API, for notebooks and scripts: `scoretrain.fit` trains a run as `scoretrain fit` does
(both start, resume and train a run through run/lifecycle.py) and `scoretrain.open_run` reads one as `eval`, `inspect` and
`export` do, with everything as NumPy arrays.

    import scoretrain
    run = scoretrain.fit("configs/mnist_fc.yaml", model__k=0.3, train__epochs=5, name="k03")
    run.metrics["test_acc"]            # one value per epoch
    run.layers[0].mask.mean()          # the kept fraction of the first layer
    w_eff = run.subnetwork()           # the effective weights the stored network computes with
    run.evaluate()["test_acc"]         # re-measured on the test split
    scoretrain.resume("runs/k03")      # an interrupted run, on from its last finished epoch

Errors a user can cause are scoretrain.errors.ScoretrainError (ConfigError for a bad spec), with
the one-line message the command prints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .kernels.backend import Backend, resolve
from .run import config as config_mod
from .run import lifecycle, store, train
from .run.resources import load_data, network, stored_subnetwork
from .run.step import evaluate


def _override(key: str, value) -> str:
    """model__k=0.3 (or {"model.k": 0.3}) as the command line's `model.k=0.3`."""
    text = value if isinstance(value, str) else config_mod.yaml_value(value)
    return f"{key.replace('__', '.')}={text}"


def fit(config: str | Path, overrides: list[str] = (), *, runs_dir: str | Path = "runs", name: str | None = None,
        quiet: bool = True, **keys) -> RunRecord:
    """Train the spec in `config` (a YAML file) with `overrides` ("model.k=0.3", as on the command
    line) and `keys` (model__k=0.3: a double underscore for each dot), into runs_dir/name (a
    generated name by default). Returns the finished run. A stopped or failed run raises, as
    `scoretrain fit` exits: its folder keeps its last finished epoch."""
    cfg = config_mod.load(Path(config), [*overrides, *(_override(k, v) for k, v in keys.items())])
    return _train(lifecycle.start(cfg, runs_dir, name), quiet)


def resume(run_dir: str | Path, *, quiet: bool = True) -> RunRecord:
    """Go on with an interrupted run from its last finished epoch, as `scoretrain fit --resume`
    does, and return the finished run. A completed run is refused (RunError): its schedule was
    laid out over its epochs; start a new run for more."""
    return _train(lifecycle.resume(Path(run_dir)), quiet)


def _train(session: lifecycle.Session, quiet: bool) -> RunRecord:
    from rich.console import Console

    from .run.progress import Reporter

    if session.note and not quiet:
        print(session.note, file=sys.stderr)
    lifecycle.train(session, Reporter(Console(file=sys.stdout), quiet))
    return open_run(session.run_dir)


def measure(run_dir: Path, device: str | None = None) -> dict:
    """Re-measure a stored run (or a ticket, FILE.ticket) on its test split with its stored masks."""
    if Path(run_dir).suffix == ".ticket" and Path(run_dir).is_file():
        return measure_ticket(Path(run_dir), device)
    run, cfg = store.open_run(run_dir)
    backend = resolve(device or cfg.device)
    dd = load_data(cfg, backend, run.attrs["input_mean"], run.attrs["input_std"])
    net = network(cfg, backend, run.weights, run.scores, run.norms)
    train.enter_epoch(net, cfg, max(run.epochs_done - 1, 0))  # the last epoch's k and (supermask) measuring sample
    w_eff = net.effective_weights(train=False)  # masks recomputed from the stored scores
    masks_ok = None
    if run.masks is not None:
        masks_ok = all(bool((backend.to_host(m) == s).all()) for m, s in zip(net.masks, run.masks))
        w_eff = net.subnetwork(run.masks)  # the stored subnetwork itself
    loss, acc = evaluate(net, w_eff, dd.x_test, dd.y_test, cfg.train.eval_batch_size)
    recorded = run.metrics["test_acc"][-1] if run.metrics["test_acc"] else None
    return {
        "run": str(run_dir), "status": store.live_status(run), "method": cfg.model.method,
        "epochs": run.epochs_done, "backend": backend.name, "device": backend.device,
        "test_samples": len(dd.y_test), "test_loss": loss, "test_acc": acc,
        "recorded_test_acc": recorded, "matches_record": None if recorded is None else acc == recorded,
        "masks_match_scores": masks_ok, "config_edited": run.edited, "environments": store.environments(run),
    }


def measure_ticket(path: Path, device: str | None = None) -> dict:
    """A ticket's subnetwork (its weights regenerated from its seed) on its test split."""
    from .commands import ticket

    t = ticket.read(path)
    cfg = t.spec
    backend = resolve(device or "cpu")
    dd = load_data(cfg, backend, t.input_mean, t.input_std)
    net = network(cfg, backend, t.weights, t.scores, t.norms)
    loss, acc = evaluate(net, net.subnetwork(t.masks), dd.x_test, dd.y_test, cfg.train.eval_batch_size)
    recorded = t.info.get("test_acc")
    return {"run": str(path), "status": "ticket", "method": cfg.model.method, "epochs": t.info.get("epochs_done"),
            "backend": backend.name, "device": backend.device, "test_samples": len(dd.y_test), "test_loss": loss,
            "test_acc": acc, "recorded_test_acc": recorded, "matches_record": None if recorded is None else acc == recorded,
            "masks_match_scores": None, "config_edited": None, "environments": []}


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

    def network(self, device: str = "cpu"):
        """The stored network (model.Network) on `device`."""
        return network(self.spec, Backend(np, "cpu") if device == "cpu" else resolve(device),
                             self._run.weights, self._run.scores, self._run.norms)

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
