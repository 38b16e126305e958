"""`scoretrain compare`: one row per run, side by side, from run directories and folders of runs.

Only run.h5's root attributes and /metrics are read (store.load_summary), never the weight
arrays, so comparing wide nets stays fast; runs still training can be read at any time
because run.h5 is replaced atomically (docs/run-format.md).

A path named on the command line must be readable: a missing path, a file, a folder with no
runs in it, or a broken run directory is a RunError (`error: ...`, exit 1). The run folders
found inside a folder of runs are only best effort: a broken one becomes a row with status
`unreadable` and its reason, so that one bad run does not hide the rest of a sweep.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..run import config as config_mod
from ..run import store
from ..errors import ConfigError, RunError, ScoretrainError

FIELDS = ("name", "path", "method", "widths", "k", "init", "epochs_done", "epochs", "status",
          "best_test_acc", "best_epoch", "final_test_acc", "seconds_per_epoch", "arch", "width", "k_scope", "scale_fan", "best_val_acc", "best_val_epoch", "test_at_best_val",
          "edited", "error")

# --sort KEY: the row field it sorts by, and whether larger comes first (accuracies: best first).
# Rows without the value (k of a dense run; accuracies before epoch 1) go last, unreadable runs after them.
SORT_KEYS = {
    "name": ("name", False), "method": ("method", False), "widths": ("widths", False), "k": ("k", False),
    "init": ("init", False), "epochs": ("epochs_done", False), "status": ("status", False),
    "best": ("best_test_acc", True), "final": ("final_test_acc", True), "seconds": ("seconds_per_epoch", False),
    "val": ("test_at_best_val", True),
}
STATUS_STYLE = {"completed": "green", "running": "cyan", "interrupted": "yellow", "failed": "red", "unreadable": "red"}


def _is_run_dir(path: Path) -> bool:
    # config.yaml is written before the first run.h5, so a folder with either is a run (maybe broken)
    return (path / store.RUN_FILE).exists() or (path / store.CONFIG_FILE).exists()


def run_dirs(path: Path) -> tuple[list[Path], bool]:
    """The run directories a command-line path stands for, and whether it named a run itself:
    the runs in a folder and in the folders below it (sweep folders, folders of runs), not in
    dot folders (a sweep's .logs) and not through symbolic links."""
    if not path.exists():
        raise RunError(f"{path}: no such run directory or folder")
    if not path.is_dir():
        raise RunError(f"{path}: not a run directory (give the folder that holds {store.RUN_FILE})")
    if _is_run_dir(path):
        return [path], True
    found = sorted(_runs_below(path))
    if not found:
        raise RunError(f"{path}: no runs here (neither a run directory nor a folder of run directories)")
    return found, False


def _runs_below(folder: Path):
    for d in folder.iterdir():
        if d.name.startswith(".") or d.is_symlink() or not d.is_dir():
            continue
        if _is_run_dir(d):
            yield d
        else:
            yield from _runs_below(d)


def read_row(run_dir: Path, keys: tuple = (), name: str | None = None) -> dict:
    """A run's row (named `name`, default its folder's name); with `keys` (dotted config keys:
    --group-by), also its spec's value of each, and its whole spec (`_spec`, dotted keys)."""
    run = store.load_summary(run_dir)
    cfg = store.load_spec(run_dir, run)
    m, model = run.metrics, cfg.model
    row = dict.fromkeys(FIELDS)
    mlp, has_k = model.arch == "mlp", model.method in config_mod.K_METHODS  # dense and supermask have no k
    row.update(name=name or run_dir.name, path=str(run_dir), method=model.method,
               widths=list(model.widths) if mlp else None, arch=model.arch, width=None if mlp else model.width,
               k=model.k if has_k else None, k_scope=model.k_scope if has_k else None,
               init=model.init, scale_fan=model.scale_fan, epochs_done=run.epochs_done, epochs=cfg.train.epochs, status=store.live_status(run),
               edited=store.edited(run_dir, cfg))
    if m["epoch"]:
        best = max(range(len(m["test_acc"])), key=m["test_acc"].__getitem__)  # the first epoch on ties
        row.update(best_test_acc=m["test_acc"][best], best_epoch=m["epoch"][best], final_test_acc=m["test_acc"][-1],
                   seconds_per_epoch=sum(m["epoch_seconds"]) / len(m["epoch_seconds"]))
        chosen = store.best_by_validation(m)  # the epoch a validation split selects: the test split chooses nothing
        if chosen is not None:
            row.update(best_val_acc=m["val_acc"][chosen], best_val_epoch=m["epoch"][chosen], test_at_best_val=m["test_acc"][chosen])
    spec = cfg.to_dict()
    for key in keys:
        row[key] = spec_value(spec, key)
    if keys:
        row["_spec"] = dict(_dotted(spec))
    return row


def _dotted(spec: dict, prefix: str = ""):
    for key, value in spec.items():
        if isinstance(value, dict) and key != "keys":  # (data.keys is a value: a mapping of names)
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def spec_value(spec: dict, key: str):
    node = spec
    for part in key.split("."):
        node = node[part]
    return node


def check_keys(keys: list[str]) -> tuple:
    """--group-by's keys, each a dotted key of the config (model.k, seed, train.lr)."""
    defaults = config_mod.Config().to_dict()
    for key in keys:
        try:
            value = spec_value(defaults, key)
        except (KeyError, TypeError):
            raise ConfigError(f"--group-by {key}: not a config key (e.g. model.k, model.method, train.lr)") from None
        if isinstance(value, dict):
            raise ConfigError(f"--group-by {key}: a section, not a key (e.g. {key}.{next(iter(value))})")
    return tuple(keys)


GROUP_FIELDS = ("n", "runs", "final_mean", "final_std", "best_mean", "best_std", "best_by", "seconds_per_epoch", "differs")

# Keys in which the runs of a group may differ besides the group's keys: the seed (the spread is
# over it), and where and how a run was computed, which changes its last bits at most.
POOLED = ("seed", "device", "data.root", "train.eval_batch_size", "train.cuda_graph", "train.tensorboard", "train.conv_engine")


def groups(rows: list[dict], keys: tuple) -> list[dict]:
    """One row per value of `keys` (in the order they sort), over the runs with a finished epoch:
    n, the mean and standard deviation (n - 1) of the final and the best test accuracy, where
    best is the test accuracy at the best validation epoch when every run of the group has a
    validation split (else the best test accuracy), and the mean seconds per epoch. `runs`
    counts every run of the group, unfinished ones too; `differs` lists the other keys in which
    its runs differ (besides POOLED), which the caller must say."""
    import statistics

    by = {}
    for r in rows:
        if r["status"] != "unreadable":
            by.setdefault(tuple(json.dumps(r[k]) for k in keys), []).append(r)
    out = []
    for key in sorted(by, key=lambda t: [_sortable(json.loads(v)) for v in t]):
        members = by[key]
        done = [r for r in members if r["final_test_acc"] is not None]
        by_val = bool(done) and all(r["test_at_best_val"] is not None for r in done)
        finals = [r["final_test_acc"] for r in done]
        bests = [r["test_at_best_val"] if by_val else r["best_test_acc"] for r in done]
        g = {k: json.loads(v) for k, v in zip(keys, key)}
        g.update(n=len(done), runs=len(members),
                 final_mean=statistics.fmean(finals) if finals else None,
                 final_std=statistics.stdev(finals) if len(finals) > 1 else None,
                 best_mean=statistics.fmean(bests) if bests else None,
                 best_std=statistics.stdev(bests) if len(bests) > 1 else None,
                 best_by="val" if by_val else "test",
                 seconds_per_epoch=statistics.fmean(r["seconds_per_epoch"] for r in done) if done else None,
                 differs=_differs(members, keys))
        out.append(g)
    return out


def _differs(members: list[dict], keys: tuple) -> list[str]:
    """The spec keys, other than `keys` and POOLED, whose values are not the same in every run."""
    specs = [r["_spec"] for r in members]
    return [k for k in specs[0] if k not in keys and k not in POOLED
            and len({json.dumps(s.get(k), sort_keys=True, default=str) for s in specs}) > 1]


def pooled_warning(grouped: list[dict], keys: tuple) -> str | None:
    """One line where some group pools runs that differ in more than its keys and the seed:
    which keys, and the --group-by that splits them."""
    differ = list(dict.fromkeys(k for g in grouped for k in g["differs"]))
    if not differ:
        return None
    n = sum(1 for g in grouped if g["differs"])
    return (f"warning: {n} of {len(grouped)} groups pool runs that differ in {', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}"
            f" (not only in {', '.join(keys)} and the seed): split them with --group-by {','.join([*keys, *differ[:6]])}")


def _sortable(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def group_csv(rows: list[dict], keys: tuple) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, (*keys, *GROUP_FIELDS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return out.getvalue()


def group_table(rows: list[dict], keys: tuple) -> Table:
    t = Table(show_edge=False, pad_edge=False)
    by_val = any(r["best_by"] == "val" for r in rows)
    mixed = any(r["differs"] for r in rows)
    for header in (*keys, "n", "final (mean ± std)", "at best val (mean ± std)" if by_val else "best (mean ± std)", "s/epoch",
                   *(["differs in"] if mixed else [])):
        t.add_column(header, justify="left" if header in keys or header == "differs in" else "right", no_wrap=header not in keys)
    for r in rows:
        spread = lambda m, s: "-" if m is None else f"{100 * m:.2f}%" + ("" if s is None else f" ± {100 * s:.2f}")  # noqa: E731
        n = f"{r['n']}" if r["n"] == r["runs"] else f"{r['n']} of {r['runs']}"
        t.add_row(*(Text(_show(r[k])) for k in keys), n, spread(r["final_mean"], r["final_std"]),
                  spread(r["best_mean"], r["best_std"]) + ("" if r["best_by"] == "val" or not by_val else " (test)"),
                  "-" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.2f}",
                  *([Text(", ".join(r["differs"]) or "-")] if mixed else []))
    return t


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "-".join(map(str, v))
    return str(v)


def collect(paths: list[Path], keys: tuple = ()) -> list[dict]:
    """Rows for all runs under `paths`, each run once; raises RunError for a bad explicit path."""
    rows, seen = [], set()
    for path in paths:
        path = Path(path)
        dirs, explicit = run_dirs(path)
        for run_dir in dirs:
            if run_dir.resolve() in seen:  # `compare runs/ runs/k0.1` lists k0.1 once
                continue
            seen.add(run_dir.resolve())
            name = run_dir.name if explicit else run_dir.relative_to(path).as_posix()  # sweep/k0.1 for a run below a folder
            try:
                rows.append(read_row(run_dir, keys, name))
            except ScoretrainError as e:
                if explicit:
                    raise RunError(str(e)) from None
                rows.append(dict(dict.fromkeys(FIELDS), name=name, path=str(run_dir), status="unreadable", error=str(e)))
    return rows


def sort_rows(rows: list[dict], key: str) -> list[dict]:
    if key not in SORT_KEYS:
        raise ConfigError(f"--sort: expected one of {', '.join(SORT_KEYS)}, got {key!r}")
    field, descending = SORT_KEYS[key]
    rows = sorted(rows, key=lambda r: (r["name"], r["path"]))  # ties keep this order (sorted is stable)
    readable = [r for r in rows if r["status"] != "unreadable"]
    present = [r for r in readable if r[field] is not None]
    return (sorted(present, key=lambda r: r[field], reverse=descending) + [r for r in readable if r[field] is None]
            + [r for r in rows if r["status"] == "unreadable"])


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        widths = row["widths"] and "-".join(map(str, row["widths"]))
        writer.writerow(dict(row, widths=widths))  # None -> empty cell; floats at full precision (repr)
    return out.getvalue()


def _pct(acc) -> str:
    return "-" if acc is None else f"{100 * acc:.2f}%"


def net_name(r: dict) -> str:
    """784-64-10 for an MLP, lenet x0.25 for a conv net."""
    return "-".join(map(str, r["widths"])) if r["widths"] else f"{r['arch']} x{r['width']:g}"


def _cells(r: dict, with_val: bool) -> list[str]:
    if r["status"] == "unreadable":
        return [r["name"]] + ["-"] * 5 + ["unreadable"] + ["-"] * (4 if with_val else 3)
    best = "-" if r["best_test_acc"] is None else f"{_pct(r['best_test_acc'])} ({r['best_epoch']})"
    at_val = ["-" if r["test_at_best_val"] is None else f"{_pct(r['test_at_best_val'])} ({r['best_val_epoch']})"] if with_val else []
    return [r["name"], r["method"], net_name(r), "-" if r["k"] is None else f"{r['k']:g}", r["init"],
            f"{r['epochs_done']}/{r['epochs']}", r["status"], best, _pct(r["final_test_acc"]), *at_val,
            "-" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.2f}"]


def table(rows: list[dict]) -> Table:
    with_val = any(r["test_at_best_val"] is not None for r in rows)  # a column only where a run has a validation split
    headers = ("run", "method", "net", "k", "init", "epochs", "status", "best (epoch)", "final",
               *(["at best val (epoch)"] if with_val else []), "s/epoch")
    folding = ("run", "method", "net", "init")  # on a narrow terminal these wrap; the numbers never shrink to "…"
    cells = [_cells(r, with_val) for r in rows]
    t = Table(show_edge=False, pad_edge=False)
    for i, header in enumerate(headers):
        if header in folding:
            t.add_column(header, overflow="fold")
        else:
            width = max(len(c[i]) for c in [headers, *cells])
            t.add_column(header, no_wrap=True, min_width=width, justify="right" if i >= 7 else "left")
    for c in cells:  # Text, not str: shown as they are, never parsed as rich markup
        t.add_row(*map(Text, c[:6]), Text(c[6], style=STATUS_STYLE.get(c[6], "")), *map(Text, c[7:]))
    return t


def print_table(console: Console, rows: list[dict]) -> None:
    print_wide(console, table(rows))


def print_wide(console: Console, t: Table) -> None:
    if console.is_terminal:
        console.print(t)
        return
    # a pipe or a file has no width: print the table whole, not squeezed into 80 columns
    width, console.width = console.width, Measurement.get(console, console.options.update_width(10_000), t).maximum
    try:
        console.print(t)
    finally:
        console.width = width
