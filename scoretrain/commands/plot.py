"""`scoretrain compare --plot FILE`: final test accuracy against k, and test accuracy per epoch.

matplotlib is an optional extra (`pip install 'scoretrain[plot]'`), imported only here and only
when a plot is asked for. Figures are drawn with the non-interactive Agg canvas, never pyplot:
no display is needed and no global backend state is touched.
"""

from __future__ import annotations

from pathlib import Path

from ..run import store
from .compare import net_name
from ..errors import ConfigError, RunError, ScoretrainError

FORMATS = ("png", "svg")
INSTALL = "pip install 'scoretrain[plot]'"


def check(path: Path) -> str:
    """The file format of `path`, once matplotlib is known to be there: called before any run is
    read, so a plot that cannot be written fails fast."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"--plot {path}: expected a .png or .svg file name")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ScoretrainError(f"--plot needs matplotlib, which is not installed: {INSTALL}") from None
    return fmt


def group_key(row: dict) -> tuple:
    """Runs with the same key differ only in k (or in what the plot does not show: seed, lr, ...)."""
    return (row["method"], net_name(row), row["init"], row["k_scope"] if row["k_scope"] == "global" else None,
            "scaled" if row.get("scale_fan") else None)


def labels(keys: list[tuple]) -> tuple[dict, str]:
    """A legend label per group with only what tells the groups apart, and the shared rest (for
    the title): a k sweep of one net against its dense baseline reads `edge-popup` / `dense`."""
    flags = {3: "global k", 4: "scaled init"}
    parts = [[p if i < 3 else (flags[i] if p else None) for i, p in enumerate(key)] for key in keys]
    varying = [i for i in range(len(flags) + 3) if len({p[i] for p in parts}) > 1] or [0]
    shared = " ".join(str(p) for i, p in enumerate(parts[0]) if i not in varying and p) if parts else ""
    names = {key: " ".join(str(p[i]) for i in varying if p[i]) for key, p in zip(keys, parts)}
    return {key: name or "per-layer k" for key, name in names.items()}, shared  # empty: differs only in not being global


def figure(rows: list[dict], histories: dict[str, tuple[list, list]]):
    """The two-panel figure. rows: compare's rows; histories: a row's path -> (epochs, test_acc).
    Left: one line per group (runs without k, dense and supermask, as dashed horizontal lines);
    right: one line per run, in its group's colour (shades by k when there is one group)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in rows if r["final_test_acc"] is not None]  # unreadable, or no epoch done yet
    if not rows:
        raise RunError("--plot: no run has a finished epoch to plot")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    names, shared = labels(list(groups))
    colour = {key: f"C{i % 10}" for i, key in enumerate(groups)}

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    by_k, by_epoch = fig.subplots(1, 2)
    for key, members in groups.items():
        accs = {}
        for r in members:
            accs.setdefault(r["k"], []).append(100 * r["final_test_acc"])
        if None in accs:  # no k: the run keeps what it keeps; a reference level across the k axis
            level = accs.pop(None)
            by_k.axhline(sum(level) / len(level), color=colour[key], linestyle="--", label=names[key])
        if accs:  # several runs at one k (seeds, ...): the line goes through their mean, dots show each
            ks = sorted(accs)
            by_k.plot(ks, [sum(accs[k]) / len(accs[k]) for k in ks], color=colour[key], marker="o", label=names[key])
            if any(len(v) > 1 for v in accs.values()):
                by_k.scatter([k for k in ks for _ in accs[k]], [a for k in ks for a in accs[k]], color=colour[key], s=12, alpha=0.5)
    by_k.set(xlim=(0, 1.02), xlabel="k (fraction of weights kept)", ylabel="final test accuracy (%)",
             title="final test accuracy against k" + (f"\n{shared}" if shared else ""))
    by_k.grid(alpha=0.3)
    by_k.legend(fontsize="small")

    # One group (a plain k sweep): each run its own shade, darker for larger k, so lines can be told
    # apart; several groups: each run in its group's colour.
    if len(groups) == 1:
        from matplotlib import colormaps

        ordered = sorted(rows, key=lambda r: (r["k"] is None, r["k"] or 0, r["name"]))
        shade = {r["path"]: colormaps["viridis_r"](0.15 + 0.8 * i / max(1, len(ordered) - 1)) for i, r in enumerate(ordered)}
    for r in rows:
        epochs, acc = histories[r["path"]]
        c = shade[r["path"]] if len(groups) == 1 else colour[group_key(r)]
        by_epoch.plot(epochs, [100 * a for a in acc], color=c, marker="o", markersize=3, label=r["name"])
    by_epoch.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy per epoch")
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
    by_epoch.grid(alpha=0.3)
    by_epoch.legend(fontsize="small", ncol=1 + len(rows) // 16)
    return fig


def plot(rows: list[dict], path: Path):
    """Read each run's per-epoch test accuracy, draw the figure and write it (atomically, so a
    viewer that reloads the file never sees half of it). Returns the figure."""
    path, fmt = Path(path), check(path)
    histories = {}
    for r in rows:
        if r["final_test_acc"] is None:
            continue
        try:
            m = store.load_summary(Path(r["path"])).metrics  # compare's rows keep only the final numbers
        except ScoretrainError:  # went bad since compare read it: left out of the plot
            continue
        histories[r["path"]] = (m["epoch"], m["test_acc"])
    fig = figure([r for r in rows if r["path"] in histories], histories)
    try:
        store.write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt))
    except OSError as e:
        raise ScoretrainError(f"--plot {path}: cannot write ({e.strerror or e})") from None
    return fig


def plot_groups(groups: list[dict], keys: tuple, path: Path):
    """compare --group-by's figure: the mean final test accuracy (and, dashed, the mean best) of
    each group against the first key, with error bars of one standard deviation over its runs;
    a line per value of the other keys. Returns the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path, fmt = Path(path), check(path)
    groups = [g for g in groups if g["final_mean"] is not None]
    if not groups:
        raise RunError("--plot: no run has a finished epoch to plot")
    x_key, rest = keys[0], keys[1:]
    numeric = all(isinstance(g[x_key], (int, float)) and not isinstance(g[x_key], bool) for g in groups)
    ticks = sorted({str(g[x_key]) for g in groups}) if not numeric else None
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lines: dict[tuple, list[dict]] = {}
    for g in groups:
        lines.setdefault(tuple(str(g[k]) for k in rest), []).append(g)
    for i, (label, members) in enumerate(lines.items()):
        xs = [g[x_key] if numeric else ticks.index(str(g[x_key])) for g in members]
        name = ", ".join(f"{k}={v}" for k, v in zip(rest, label))
        for field, style, what in (("final", "-", "final"), ("best", ":", "best")):
            by_val = field == "best" and all(g["best_by"] == "val" for g in members)
            ax.errorbar(xs, [100 * g[f"{field}_mean"] for g in members], yerr=[100 * (g[f"{field}_std"] or 0) for g in members],
                        color=f"C{i % 10}", linestyle=style, marker="o", capsize=3,
                        label=" ".join(p for p in (name, "at best val" if by_val else what) if p))
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), ticks)
    n = sorted({g["n"] for g in groups})
    ax.set(xlabel=x_key, ylabel="test accuracy (%)",
           title=f"test accuracy against {x_key}: mean ± std over {'-'.join(map(str, (n[0], n[-1])) if len(n) > 1 else str(n[0]))} runs each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    try:
        store.write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt))
    except OSError as e:
        raise ScoretrainError(f"--plot {path}: cannot write ({e.strerror or e})") from None
    return fig
