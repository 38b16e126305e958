"""The command line: `scoretrain fit`, `eval` (and friends). Errors a user can cause are
printed as one line on stderr with a non-zero exit code, never as a traceback."""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import config as config_mod
from . import store, train
from .backend import resolve
from .errors import ConfigError, ScoretrainError
from .progress import Reporter, summary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find the subnetworks hidden in randomly weighted networks (edge-popup), and train dense baselines.",
)
# Off a terminal, rich would wrap at 80 columns: lines in logs stay whole instead.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False)


def user_errors(fn):
    """Turn ScoretrainError into `error: <message>` and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ScoretrainError as e:
            err_console.print(f"error: {e}", soft_wrap=True, markup=False)
            raise typer.Exit(e.exit_code) from None

    return wrapper


@app.command()
@user_errors
def fit(
    config: Optional[Path] = typer.Argument(None, help="Experiment spec (YAML), e.g. configs/mnist_fc.yaml.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted key=value overrides, values parsed as YAML: model.k=0.3 model.widths=[784,500,10].", show_default=False),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Run name (a folder under --runs-dir); default: generated, unique."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Folder that holds the run folders."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run from its last finished epoch.", show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the summary."),
) -> None:
    """Train a score network (or a dense baseline) and write a run directory."""
    if resume is not None:
        if config is not None or overrides:
            raise ConfigError("--resume takes no config or overrides: a run resumes with the spec it was started with")
        run_dir = resume
        store.claim(run_dir)  # before reading the status: two resumes of one run cannot both pass the check
        try:
            if store.never_checkpointed(run_dir):  # killed before its first checkpoint: start it over
                cfg = config_mod.load(run_dir / store.CONFIG_FILE)
                backend = resolve(cfg.device)
                dd = train.load_data(cfg, backend)
                run = train.new_run(cfg, backend, dd)
            else:
                run = store.load(run_dir, with_optimizer=True)
                cfg = config_mod.load(run_dir / store.CONFIG_FILE)
                train.check_resumable(run, run_dir)
                backend = resolve(cfg.device)
                dd = train.load_data(cfg, backend, run.attrs["input_mean"], run.attrs["input_std"])
                run.attrs.update(status="running", pid=os.getpid(), host=socket.gethostname(), message="")
            store.remove_stale_temps(run_dir)  # left by a writer killed in mid-checkpoint
        except BaseException:
            store.release(run_dir)
            raise
    else:
        if config is None:
            raise ConfigError("fit needs a config file (e.g. configs/mnist_fc.yaml) or --resume RUN_DIR")
        cfg = config_mod.load(config, overrides or [])
        backend = resolve(cfg.device)
        dd = train.load_data(cfg, backend)  # before the run folder exists: bad data leaves no empty run
        stem = cfg.model.method + (f"-k{cfg.model.k:g}" if cfg.model.method == "edge-popup" else "")
        run_dir = store.create_run_dir(runs_dir, name, stem)
        store.claim(run_dir)  # a --resume of it is refused while this process trains it
        store.write_config(run_dir, config_mod.dump(cfg))
        run = train.new_run(cfg, backend, dd)
    reporter = Reporter(console, quiet)
    try:
        store.save(run_dir, run)
        train.fit(cfg, run_dir, backend, run, dd, reporter)
    except train.Interrupted as e:
        reporter.close()
        err_console.print(f"interrupted after epoch {run.epochs_done}; resume with: scoretrain fit --resume {run_dir}",
                          soft_wrap=True, markup=False)  # one line, however long the path
        raise typer.Exit(128 + e.signum) from None
    except train.Diverged as e:
        reporter.close()
        err_console.print(f"error: {run_dir}: {e}; run marked failed, epoch {run.epochs_done} kept", soft_wrap=True, markup=False)
        raise typer.Exit(1) from None
    finally:
        reporter.close()
        store.release(run_dir)
    summary(console, run_dir, run)


def measure(run_dir: Path, device: Optional[str]) -> dict:
    """Re-measure a stored run on its test split with its stored masks."""
    run = store.load(run_dir)
    cfg = config_mod.load(run_dir / store.CONFIG_FILE)
    backend = resolve(device or cfg.device)
    dd = train.load_data(cfg, backend, run.attrs["input_mean"], run.attrs["input_std"])
    net = train.network(cfg, backend, run.weights, run.scores)
    net.reseed(cfg.seed, max(run.epochs_done - 1, 0))  # supermask: the last epoch's measuring sample
    w_eff = net.effective_weights(train=False)  # masks recomputed from the stored scores
    masks_ok = None
    if run.masks is not None:
        masks_ok = all(bool((backend.to_host(m) == s).all()) for m, s in zip(net.masks, run.masks))
        w_eff = net.subnetwork(run.masks)  # the stored subnetwork itself
    loss, acc = train.evaluate(net, w_eff, dd.x_test, dd.y_test, cfg.train.eval_batch_size)
    recorded = run.metrics["test_acc"][-1] if run.metrics["test_acc"] else None
    return {
        "run": str(run_dir), "status": store.live_status(run), "method": cfg.model.method,
        "epochs": run.epochs_done, "backend": backend.name, "device": backend.device,
        "test_samples": len(dd.y_test), "test_loss": loss, "test_acc": acc,
        "recorded_test_acc": recorded, "matches_record": None if recorded is None else acc == recorded,
        "masks_match_scores": masks_ok,
    }


@app.command()
@user_errors
def bench(
    device: str = typer.Option("auto", "--device", help="auto, cpu, gpu or gpu:N."),
    quick: bool = typer.Option(False, "--quick", help="Fewer steps per case (a smoke run)."),
    json_path: Path = typer.Option(Path("bench.json"), "--json", help="Where to write the figures as JSON."),
) -> None:
    """Measure seconds per epoch and samples/s of edge-popup and dense training (a benchmark, not a test)."""
    from . import bench as bench_mod  # only this command needs it

    cfg = config_mod.validate(config_mod.Config(device=device))
    backend = resolve(device)
    dd = train.load_data(cfg, backend)
    results = bench_mod.run(backend, dd.x_train, dd.y_train, quick, console)
    json_path.write_text(json.dumps(results, indent=1))
    console.print(f"figures written to {json_path}")


@app.command("eval")
@user_errors
def eval_(
    run_dir: Path = typer.Argument(..., help="A run directory written by `fit`.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, gpu or gpu:N (default: the run's)."),
) -> None:
    """Reload a run and re-measure its stored network on the test split."""
    if device is not None:
        config_mod.validate(config_mod.Config(device=device))
    result = measure(run_dir, device)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"eval {run_dir}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", f"{result['status']} ({result['epochs']} epoch{'' if result['epochs'] == 1 else 's'})")
    table.add_row("test acc", f"{100 * result['test_acc']:.2f}%  (loss {result['test_loss']:.4f}, {result['test_samples']} samples)")
    if result["recorded_test_acc"] is not None:
        same = "reproduced exactly" if result["matches_record"] else "differs"
        table.add_row("recorded", f"{100 * result['recorded_test_acc']:.2f}%  ({same})")
    if result["masks_match_scores"] is not None:
        table.add_row("masks", "match the scores' top-k" if result["masks_match_scores"] else "DIFFER from the scores' top-k")
    table.add_row("backend", f"{result['backend']} ({result['device']})")
    console.print(table)


@app.command()
@user_errors
def compare(
    paths: List[Path] = typer.Argument(..., help="Run directories and/or folders of runs (e.g. runs/), mixed.", show_default=False, metavar="RUN_DIR..."),
    sort: str = typer.Option("k", "--sort", help="k (default: a K sweep in order of k), name, method, widths, init, epochs, status, best, final or seconds. Accuracies sort best first, the rest ascending; ties by name; runs without the value last."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV for scripts (full precision)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of rows for scripts (full precision)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw final test accuracy against k and test accuracy per epoch into FILE.png or FILE.svg (needs: pip install 'scoretrain\\[plot]').", show_default=False, metavar="FILE"),
) -> None:
    """Compare runs side by side: method, widths, k, epochs, status, best and final test accuracy, s/epoch.

    Reads only run.h5's metrics and attributes (fast, also on runs still training). A run that is
    not readable is an error (exit 1) when named itself; inside a folder of runs it is listed with
    status unreadable (the reason in --csv/--json and on stderr), and the others are still shown.
    """
    from . import compare as compare_mod

    if as_csv and as_json:
        raise ConfigError("--csv and --json: choose one")
    compare_mod.sort_rows([], sort)  # refuses an unknown --sort before any file is read
    if plot is not None:
        from . import plot as plot_mod

        plot_mod.check(plot)  # likewise a bad file name, or no matplotlib
    rows = compare_mod.sort_rows(compare_mod.collect(paths), sort)
    if as_json or as_csv:
        print(compare_mod.to_json(rows) if as_json else compare_mod.to_csv(rows), end="\n" if as_json else "")
    else:
        compare_mod.print_table(console, rows)
        for row in rows:
            if row["error"]:
                err_console.print(f"unreadable: {row['error']}", soft_wrap=True, markup=False)
    if plot is not None:
        plot_mod.plot(rows, plot)
        err_console.print(f"plot written to {plot}", soft_wrap=True, markup=False)  # stderr: --json/--csv stay clean


@app.command("inspect")
@user_errors
def inspect_(
    run_dir: Path = typer.Argument(..., help="A run directory written by `fit`.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Per layer: kept fraction, how far the mask moved, score statistics, sign balance of the kept weights."""
    from . import inspect_run

    report = inspect_run.inspect(run_dir)
    if as_json:
        print(json.dumps(report))
        return
    inspect_run.print_report(console, report)


@app.command()
@user_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by `fit`.", show_default=False),
    to: Path = typer.Option(..., "--to", help="The .npz file to write.", show_default=False, metavar="FILE.npz"),
    force: bool = typer.Option(False, "--force", help="Overwrite FILE if it exists."),
) -> None:
    """Write the subnetwork as plain masked weight arrays + architecture in one .npz (docs/run-format.md)."""
    from . import export as export_mod

    out = export_mod.export(run_dir, to, force)
    n = sum(int((a != 0).sum()) for key, a in out.items() if key.startswith("weight_"))
    console.print(f"{to}: {sum(k.startswith('weight_') for k in out)} weight layers, {n:,} nonzero weights", soft_wrap=True, markup=False)


# ----------------------------------------------------------------------------- scoretrain data

from . import data as data_mod  # noqa: E402 - kept with the commands that use it

data_app = typer.Typer(no_args_is_help=True, help="Download, verify and list the datasets.")


@data_app.command("fetch")
@user_errors
def data_fetch(
    name: str = typer.Argument(..., help=f"The dataset: {', '.join(data_mod.DATASETS)}.", show_default=False),
    root: Optional[Path] = typer.Option(None, "--root", help="Put the files in ROOT/NAME (default: the repo's data/ if it has them, else the user cache).", show_default=False),
) -> None:
    """Download a dataset's files (if they are not here yet) and verify their SHA-256."""
    folder, report = data_mod.fetch(name, None if root is None else str(root))
    console.print(f"{name}: {folder}", soft_wrap=True, markup=False)
    for path, what in report:
        console.print(f"  {path.name}  {what}", soft_wrap=True, markup=False)


@data_app.command("list")
def data_list() -> None:
    """The known datasets and where their files are (not verified: see `data fetch`)."""
    for name, spec in data_mod.DATASETS.items():
        here = [base / name for base in (data_mod.REPO_DATA, data_mod.cache_dir()) if data_mod.complete(base / name, spec)]
        console.print(f"{name:<14} {here[0] if here else 'not downloaded (scoretrain data fetch ' + name + ')'}", soft_wrap=True, markup=False)


app.add_typer(data_app, name="data")


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # a usage error (unknown option, missing argument): one line too
        command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in typer.main.get_command(app).commands else ""
        err_console.print(f"error: {e.format_message()} (see: scoretrain {command} --help)".replace("  ", " "), soft_wrap=True, markup=False)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    sys.exit(code or 0)
