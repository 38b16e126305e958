"""`scoretrain inspect`: what a run's subnetwork looks like, layer by layer.

Per weight layer: the kept fraction of its mask, how much the mask moved during training (the
per-epoch fraction of mask entries that changed, recorded by `fit` in /layers/NN/mask_change),
the score statistics (all scores; |scores| of the kept and of the pruned weights) and the sign
balance of the kept weights. Dense runs have no scores or masks: weight statistics only.
(Named inspect_run, not inspect, so as not to shadow the standard library's module.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..run import store
from .compare import net_name, print_wide
from ..run.config import K_METHODS


def _stats(a: np.ndarray) -> dict | None:
    if a.size == 0:  # e.g. the pruned weights of a layer with k = 1
        return None
    a = a.astype(np.float64)  # float32 sums of wide layers would lose digits
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def unit_mask(mask: np.ndarray, shape: tuple) -> np.ndarray:
    """The mask of a layer's score units (model.score_granularity) from its weights' mask: a
    unit is kept with all the weights it covers."""
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and mask.shape[i] != 1)
    return mask.all(axis=axes, keepdims=True) if axes else mask


def _movement(per_epoch: list[float]) -> dict | None:
    """The first and last epoch's mask change, and the total: their sum over all epochs (how much
    the mask churned, which can exceed 1; not how far the final mask is from the initial one)."""
    values = [v for v in per_epoch if not math.isnan(v)]  # dense runs record nan
    if not values:
        return None
    return {"first": values[0], "last": values[-1], "total": float(sum(values))}


def inspect(run_dir: Path) -> dict:
    """Everything `inspect` shows, as plain JSON-ready values, of a run directory or a ticket
    (FILE.ticket, read as `eval` reads it). RunError for an unreadable run."""
    run_dir = Path(run_dir)
    if run_dir.suffix == ".ticket" and run_dir.is_file():
        return _ticket(run_dir)
    run, cfg = store.open_run(run_dir)
    test_acc = run.metrics["test_acc"]
    return _report(run_dir, run, cfg, store.live_status(run), run.epochs_done, test_acc[-1] if test_acc else None)


def _ticket(path: Path) -> dict:
    """A ticket's subnetwork: the weights regenerated from its seed and its masks; a ticket keeps
    no scores and no per-epoch history, so those columns are empty."""
    from . import ticket

    t = ticket.read(path)
    run = store.Run(attrs={}, weights=t.weights, masks=t.masks, norms=t.norms, k=t.spec.model.k)
    return _report(path, run, t.spec, "ticket", t.info.get("epochs_done"), t.info.get("test_acc"))


def _report(where: Path, run: store.Run, cfg, status: str, epochs_done, test_acc) -> dict:
    model = cfg.model
    masked = run.masks is not None  # no masks: dense, or stopped before epoch 1 ended
    layers = []
    for i, w in enumerate(run.weights):
        layer = {"layer": f"{i:02d}", "kind": "conv" if w.ndim == 4 else "linear", "shape": list(w.shape),
                 "size": int(w.size), "weights": _stats(w)}
        if run.scores is not None:
            layer["scores"] = _stats(run.scores[i])
        if masked:
            m = run.masks[i]
            s = None if run.scores is None else np.abs(run.scores[i])
            units = None if s is None else unit_mask(m, s.shape)
            layer.update(
                score_units=None if s is None else int(s.size),
                kept=float(m.mean()),
                mask_change=_movement([row[i] for row in run.mask_change_layers]),
                abs_scores_kept=None if s is None else _stats(s[units]),
                abs_scores_pruned=None if s is None else _stats(s[~units]),
                # biprop uses alpha * sign(W) with alpha > 0: the sign is W's here too
                kept_positive=float((w[m] > 0).mean()) if m.any() else None,
            )
        layers.append(layer)
    return {
        "run": str(where), "status": status, "method": model.method, "arch": model.arch,
        "widths": list(model.widths) if model.arch == "mlp" else None, "width": None if model.arch == "mlp" else model.width,
        "k": model.k if model.method in K_METHODS else None,
        "k_scope": model.k_scope if model.method in K_METHODS else None,
        "init": model.init, "score_granularity": model.score_granularity if masked or run.scores is not None else None,
        "epochs_done": epochs_done, "test_acc": test_acc,
        "kept": float(sum(m.sum() for m in run.masks) / sum(m.size for m in run.masks)) if masked else None,
        "mask_change": _movement(run.metrics["mask_change"]) if masked else None,
        "config_edited": run.edited,
        "environments": store.environments(run),
        "layers": layers,
    }


# --- the table --------------------------------------------------------------------------------


def _f(x, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _moved(mc: dict | None) -> str:
    return "-" if mc is None else f"{_pct(mc['first'])} / {_pct(mc['last'])} / {_pct(mc['total'])}"


def header(r: dict) -> str:
    what = [r["method"], net_name(r), r["init"]]
    if r["k"] is not None:
        what.append(f"k={r['k']:g}" + (" (global)" if r["k_scope"] == "global" else ""))
    if r["score_granularity"] not in (None, "weight"):
        what.append(f"one score per {r['score_granularity']}")
    line = f"{r['run']}: {' '.join(what)}, {r['status']}, {r['epochs_done']} epochs, test acc {_pct(r['test_acc'])}"
    if r["kept"] is not None:
        line += (f"\nkept {_pct(r['kept'])} of the weights; the mask moved {_moved(r['mask_change'])} "
                 "(first epoch / last epoch / total of all epochs)")
    for env in r["environments"]:  # one per session that trained it
        libs = ", ".join(f"{k} {env[k]}" for k in ("scoretrain", "numpy", "numba", "llvmlite", "cupy", "cuda", "gpu") if env.get(k))
        line += f"\nepochs {env['from_epoch']}..: {libs}; BLAS {env['blas']}; {env['cpu']}"
    return line


def _table(headers: list[str], rows: list[list[str]]) -> Table:
    t = Table(show_edge=False, pad_edge=False)
    for i, name in enumerate(headers):
        # On a narrow terminal the cells with spaces wrap between their numbers and the headers
        # wrap; a single number is never cut to "…".
        single = max((len(row[i].split()[0]) for row in rows), default=0)
        t.add_column(name, min_width=single, justify="left" if name in ("layer", "kind", "shape") else "right")
    for row in rows:
        t.add_row(*map(Text, row))  # Text: shown as is, never parsed as rich markup
    return t


def tables(r: dict) -> list[Table]:
    """Masked runs: the masks, then the scores (two tables, so each fits 80 columns); dense: the weights."""
    layers = r["layers"]
    shape = lambda L: [L["layer"], L["kind"], "x".join(map(str, L["shape"]))]  # noqa: E731
    spread = lambda s: [f"{_f(s['mean'])} ± {_f(s['std'])}", f"{_f(s['min'])} .. {_f(s['max'])}"]  # noqa: E731
    if r["kept"] is None:
        return [_table(["layer", "kind", "shape", "weight mean ± std", "weight min .. max"],
                       [shape(L) + spread(L["weights"]) for L in layers])]
    masks = _table(["layer", "kind", "shape", "kept", "mask moved first / last / total", "kept W > 0"],
                   [shape(L) + [_pct(L["kept"]), _moved(L["mask_change"]), _pct(L["kept_positive"])] for L in layers])
    if "scores" not in layers[0]:  # a ticket keeps no scores
        return [masks]
    scores = _table(["layer", "score mean ± std", "score min .. max", "|score| kept", "|score| pruned"],
                    [[L["layer"], *spread(L["scores"]), _f(L["abs_scores_kept"] and L["abs_scores_kept"]["mean"]),
                      _f(L["abs_scores_pruned"] and L["abs_scores_pruned"]["mean"])] for L in layers])
    return [masks, scores]


def print_report(console: Console, r: dict) -> None:
    console.print(Text(header(r)), soft_wrap=True)
    for t in tables(r):
        console.print()
        print_wide(console, t)  # off a terminal: whole, not squeezed into 80 columns
