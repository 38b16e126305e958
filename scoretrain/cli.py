"""The command line: `scoretrain fit`, `eval` (and friends). Errors a user can cause are
printed as one line on stderr with a non-zero exit code, never as a traceback."""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import api
from .errors import ConfigError, ScoretrainError, failure, os_reason
from .kernels.backend import resolve
from .run import config as config_mod
from .run import lifecycle, store, train
from .run.progress import Reporter, summary
from .run.resources import load_data

HELP = {"help_option_names": ["-h", "--help"]}  # -h as well, on every command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=HELP,
    help="Find the subnetworks hidden in randomly weighted networks (edge-popup), and train dense baselines.",
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"scoretrain {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Find the subnetworks hidden in randomly weighted networks (edge-popup), and train dense baselines."""


class Output(Console):
    """stdout. A reader that goes away (`scoretrain fit ... | head -2`) is no error: from then on
    the output is dropped and the command carries on (rich's default would exit with status 1,
    in the middle of training)."""

    closed = False

    def on_broken_pipe(self) -> None:
        self.quiet = self.closed = True
        devnull = os.open(os.devnull, os.O_WRONLY)  # also for the interpreter's last flush of sys.stdout
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


Console.on_broken_pipe = Output.on_broken_pipe  # the same for the consoles Typer makes (--help)

# Off a terminal, rich would wrap at 80 columns: lines in logs stay whole instead.
console = Output(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, emoji=False)


def say(line: str) -> None:
    """One line on stderr, never wrapped, never parsed as markup (or emoji codes)."""
    try:
        err_console.print(line, soft_wrap=True, markup=False)
    except MemoryError:  # rich allocates as it renders: out of memory, the line as it is
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def emit(text: str) -> None:
    """Plain text (JSON, CSV) on stdout, as Output does: a closed pipe drops the rest."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        console.on_broken_pipe()


def user_errors(fn):
    """Turn ScoretrainError into `error: <message>` and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ScoretrainError as e:
            say(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        except MemoryError as e:  # an allocation that cannot succeed, outside a training run
            say(f"error: {failure(e)}: use a smaller network or batch")
            raise typer.Exit(1) from None

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
        session = lifecycle.resume(resume)
    else:
        if config is None:
            raise ConfigError("fit needs a config file (e.g. configs/mnist_fc.yaml) or --resume RUN_DIR")
        session = lifecycle.start(config_mod.load(config, overrides or []), runs_dir, name)
    _train(session, quiet)


def _train(session: lifecycle.Session, quiet: bool) -> None:
    """Train a claimed run to its end and print its summary; each way it can stop is one line on
    stderr and its exit code (typer.Exit), with the run's record kept true."""
    run_dir, run = session.run_dir, session.run
    if session.note:
        say(session.note)
    reporter = Reporter(console, quiet)
    try:
        lifecycle.train(session, reporter)
    except train.Interrupted as e:
        err_console.print(f"interrupted after epoch {run.epochs_done}; resume with: scoretrain fit --resume {run_dir}",
                          soft_wrap=True, markup=False)  # one line, however long the path
        raise typer.Exit(128 + e.signum) from None
    except train.Diverged as e:
        say(f"error: {run_dir}: {e}; run marked failed, epoch {run.epochs_done} kept")
        raise typer.Exit(1) from None
    except train.CheckpointError as e:
        what = f"{e.stopped}, and run.h5 could not record it" if e.stopped else f"cannot write the checkpoint of epoch {run.epochs_done}"
        say(f"error: {run_dir}: {what}: {e}; run.h5 keeps epoch {e.kept}: make room, then resume with: scoretrain fit --resume {run_dir}")
        raise typer.Exit(1) from None
    except Exception as e:  # out of memory, a fault: train.fit marked the run failed and kept its last epoch
        say(f"error: {run_dir}: {failure(e)} in epoch {run.epochs_saved + 1}; run marked failed, epoch {run.epochs_saved} kept")
        raise typer.Exit(1) from None
    summary(console, run_dir, run)
    if console.closed:  # `fit ... | head`: the reader left, the run did not
        say(f"stdout was closed; the run trained on to the end: {run_dir} is {run.attrs['status']} after {run.epochs_done} epochs")


MAX_JOBS = 256  # --jobs: runs at a time in one local pool (each a process of its own)


@app.command()
@user_errors
def sweep(
    config: Optional[Path] = typer.Argument(None, help="Base experiment spec (YAML); its `sweep:` section, if any, gives grid axes too.", show_default=False),
    grid: Optional[List[str]] = typer.Argument(None, help="key=v1,v2,... (values parsed as YAML), key=a:b[:step] (integers a..b-1), or key=value (fixed), each key once: model.k=0.1,0.3 seed=0:3 train.epochs=2.", show_default=False, metavar="GRID..."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="The sweep's folder (its runs and its record, sweep.yaml): new, empty, or this sweep's; default: runs/<config name>.", show_default=False),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, max=MAX_JOBS, help="Local pool: runs at a time (at most the number of runs), each with cores/jobs BLAS threads."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Local pool on GPUs: device ids, one run per device at a time, e.g. 0,1,2,3.", show_default=False),
    launcher: str = typer.Option("local", "--launcher", help="local (a pool of processes here) or slurm (one job array, through submitit: pip install 'scoretrain\\[slurm]')."),
    partition: Optional[str] = typer.Option(None, "--partition", help="Slurm partition.", show_default=False),
    time_min: int = typer.Option(60, "--time", min=1, help="Slurm: time limit per run, in minutes."),
    cpus_per_run: int = typer.Option(1, "--cpus-per-run", min=1, help="Slurm: CPUs (and BLAS threads) per run."),
    gpus_per_run: int = typer.Option(0, "--gpus-per-run", min=0, help="Slurm: GPUs per run."),
    mem: Optional[str] = typer.Option(None, "--mem", help="Slurm: memory per run, e.g. 8G.", show_default=False),
    array_parallelism: int = typer.Option(256, "--array-parallelism", min=1, help="Slurm: runs of the array at a time."),
    slurm: Optional[List[str]] = typer.Option(None, "--slurm", help="Slurm: any other sbatch option, KEY=VALUE (e.g. --slurm account=lab --slurm qos=short); repeatable.", show_default=False),
    wait: bool = typer.Option(False, "--wait", help="Slurm: follow the runs until the job array ends (else print its job id and return)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and their state (completed, running, interrupted, failed with its reason, missing); start nothing. Exits as the sweep would refuse."),
    status: Optional[Path] = typer.Option(None, "--status", help="The same list, for an existing sweep folder (no config needed).", show_default=False, metavar="SWEEP_DIR"),
    extend: bool = typer.Option(False, "--extend", help="Add this grid's runs to a sweep folder made by another grid of the same base config."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Train the failed runs again, from their last finished epoch (else they are left as they are)."),
) -> None:
    """Train a grid of runs of one config (the product of the GRID values) into one folder.

    Running the same sweep again skips completed runs, resumes interrupted ones and starts missing
    ones (failed ones with --retry-failed); two sweep commands over one folder never train a run
    twice. Exit 0 only when every run completed. Compare the results with
    `scoretrain compare SWEEP_DIR --group-by model.k`.
    """
    from .commands import sweep as sweep_mod

    if status is not None:
        if config is not None or grid:
            raise ConfigError("--status takes a sweep folder, no config or grid")
        record = sweep_mod.read(status)
        _sweep_table(status, record, record.runs)
        return
    if config is None:
        raise ConfigError("sweep needs a base config (e.g. configs/mnist_fc.yaml) and a grid (model.k=0.1,0.3 seed=0:3), or --status SWEEP_DIR")
    if launcher not in ("local", "slurm"):
        raise ConfigError(f"--launcher: expected local or slurm, got {launcher!r}")
    gpu_ids = _gpu_ids(gpus)
    extra = _key_values(slurm or [], "--slurm")
    plan = sweep_mod.plan(config, grid or [])
    sweep_dir = runs_dir if runs_dir is not None else Path("runs") / config.stem
    again = shlex.join(["scoretrain", "sweep", str(config), *(grid or []), "--runs-dir", str(sweep_dir),
                        *(["--extend"] if extend else []), *(["--retry-failed"] if retry_failed else [])])

    def refusals() -> None:  # everything that refuses the sweep, before anything is written
        if launcher == "slurm":
            sweep_mod.check_slurm()
        sweep_mod.check_folder(sweep_dir, plan, extend)
        sweep_mod.check_data(plan)

    if dry_run:
        _sweep_table(sweep_dir, plan, plan.runs)
        try:
            refusals()
        except ScoretrainError as e:
            raise type(e)(f"{e} (so the sweep would refuse to start)") from None
        return
    refusals()
    plan.launcher = ({"kind": "slurm", "partition": partition, "time": time_min, "cpus_per_run": cpus_per_run,
                      "gpus_per_run": gpus_per_run, "mem": mem, "array_parallelism": array_parallelism, "slurm": extra}
                     if launcher == "slurm" else {"kind": "local", "jobs": jobs, "gpus": gpu_ids})
    settled = sweep_mod.settle(sweep_dir, plan, extend)
    skip = [s for s in sweep_mod.DONE if not (retry_failed and s == "failed")]
    names = [n for n in plan.runs if sweep_mod.state(sweep_dir / n)[0] not in skip]
    if not names:
        final = _sweep_table(sweep_dir, settled.record, plan.runs)
        _sweep_verdict(sweep_dir, final, again, retry_failed, "nothing to train: ")
        say(f"{sweep_dir}: all {len(plan.runs)} runs are completed; nothing to train")
        return
    if launcher == "slurm":
        settings = sweep_mod.SlurmSettings(partition, time_min, cpus_per_run, gpus_per_run, mem, array_parallelism, extra)
        settled.make(sweep_dir / sweep_mod.LOGS)
        settled.make(sweep_dir / sweep_mod.SLURM_DIR)
        try:
            job = sweep_mod.submit(sweep_dir, names, settings, retry_failed)
        except BaseException:
            settled.undo(sweep_dir)  # no run started: the folder as it was
            raise
        say(f"submitted Slurm job array {job}: {len(names)} runs; follow with: scoretrain sweep --status {sweep_dir}")
        if not wait:
            return
        try:
            _follow(sweep_dir, plan, lambda: sweep_mod.queued(job) > 0)
        except KeyboardInterrupt:
            say(f"stopped following; the job array {job} goes on: scoretrain sweep --status {sweep_dir}")
            raise typer.Exit(130) from None
    else:
        at_once = len(gpu_ids) if gpu_ids else min(jobs, len(names))
        say(f"{sweep_dir}: {len(names)} of {len(plan.runs)} runs to train, {at_once} at a time")
        try:
            _run_pool(sweep_dir, plan, names, jobs, gpu_ids, retry_failed)
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or SIGTERM (main's handler raises SystemExit)
            code = 130 if isinstance(e, KeyboardInterrupt) else e.code
            say(f"interrupted: the runs in progress keep their finished epochs; continue with: {again}")
            raise typer.Exit(code) from None
    final = _sweep_table(sweep_dir, settled.record, plan.runs)
    _sweep_verdict(sweep_dir, final, again, retry_failed)


def _sweep_verdict(sweep_dir: Path, final: dict, again: str, retried: bool = False, prefix: str = "") -> None:
    """Exit 1, with one line saying what to do for each kind of run that did not complete, unless
    every run completed (or another process trains it now). `retried`: --retry-failed was given."""
    from .commands import sweep as sweep_mod

    retry = ("{they} failed again when retried (the same spec fails the same way): change the spec, in a sweep of {their} own" if retried
             else "add --retry-failed to train {them} again from {their} last finished epoch")
    hints = {"failed": retry,
             "interrupted": "run the same sweep again to resume {them}", "missing": "run the same sweep again to start {them}",
             "unreadable": "{their} run.h5 cannot be read: move {those} folder{s} away and run the same sweep again"}
    bad = {}
    for n, (st, *_) in final.items():
        if st in hints:
            bad.setdefault(st, []).append(n)
    if not bad:
        return
    parts = []
    for st, names in bad.items():
        one = len(names) == 1
        hint = hints[st].format(them="it" if one else "them", their="its" if one else "their", they="it" if one else "they",
                                those="that" if one else "those", s="" if one else "s")
        parts.append(f"{len(names)} {st} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}): {hint}")
    n_bad = sum(map(len, bad.values()))
    say(f"error: {prefix}{n_bad} of {len(final)} runs did not complete: {'; '.join(parts)} "
        f"(reasons: scoretrain sweep --status {sweep_dir}; logs: {sweep_dir / sweep_mod.LOGS})")
    raise typer.Exit(1)


def _gpu_ids(text: Optional[str]) -> list[str] | None:
    if text is None:
        return None
    ids = [t.strip() for t in text.split(",")]
    if not all(t.isdigit() for t in ids):
        raise ConfigError(f"--gpus {text!r}: expected device ids, e.g. 0,1")
    return ids


def _key_values(items: list[str], option: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE, e.g. {option} account=mylab")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _sweep_table(sweep_dir: Path, record, names) -> dict:
    """The runs of a sweep and their state, from the run store; returns name -> state."""
    from rich.text import Text

    from .commands import sweep as sweep_mod
    from .commands.compare import STATUS_STYLE, print_wide

    states = {n: sweep_mod.state(Path(sweep_dir) / n) for n in names}
    t = Table(show_edge=False, pad_edge=False)
    for header in ("run", "overrides", "state", "epochs", "final"):
        t.add_column(header, justify="right" if header in ("epochs", "final") else "left")
    base_n = len(os.path.commonprefix(list(record.runs.values()))) if len(record.runs) > 1 else 0
    for n, (st, done, total, final) in states.items():
        t.add_row(Text(n), Text(" ".join(record.runs[n][base_n:])), Text(st, style=STATUS_STYLE.get(st, "")),  # never markup
                  f"{done}/{total}" if total else "-", "-" if final is None else f"{100 * final:.2f}%")
    print_wide(console, t)
    counts = {}
    for st, *_ in states.values():
        counts[st] = counts.get(st, 0) + 1
    console.print(f"{len(states)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), highlight=False)
    for n, (st, *_) in states.items():  # why each run that did not complete stopped, where that is known
        reason = sweep_mod.why(Path(sweep_dir) / n, st)
        if reason:
            console.print(f"{n}: {st}: {reason}", soft_wrap=True, markup=False, highlight=False)
    return states


def _run_pool(sweep_dir: Path, plan, names: list[str], jobs: int, gpu_ids, retry_failed: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .commands import sweep as sweep_mod

    total = len(names)
    live = console.is_terminal
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not live)
    overall = progress.add_task("runs", total=total)
    tasks, ended = {}, [0]

    def on_event(name, what, code):
        if what == "start":
            tasks[name] = progress.add_task(f"  {name}", total=None)
        elif what == "end":
            ended[0] += 1
            progress.remove_task(tasks.pop(name))
            progress.advance(overall)
            st, done, epochs, final = sweep_mod.state(sweep_dir / name)
            acc = "" if final is None else f", test {100 * final:.2f}%"
            progress.console.print(f"[{ended[0]}/{total}] {name}: {st} ({done}/{epochs} epochs{acc})", highlight=False, markup=False)
        elif live:
            for n, task in tasks.items():
                _, done, epochs, _ = sweep_mod.state(sweep_dir / n)
                progress.update(task, completed=done, total=epochs or None)

    with progress:
        sweep_mod.run_local(sweep_dir, names, jobs, gpu_ids, on_event, retry_failed)


def _follow(sweep_dir: Path, plan, active) -> None:
    """--wait: a progress bar of the runs done, from the run store, until `active()` is false."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .commands import sweep as sweep_mod

    with Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("runs", total=len(plan.runs))
        while active():
            done = sum(sweep_mod.state(sweep_dir / n)[0] in sweep_mod.DONE for n in plan.runs)
            progress.update(task, completed=done)
            time.sleep(1.0)


@app.command("sweep-worker", hidden=True)
@user_errors
def sweep_worker(
    sweep_dir: Path = typer.Argument(..., help="The sweep's folder."),
    name: str = typer.Argument(..., help="The run's name in it."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Train the run again if it failed."),
) -> None:
    """One run of a sweep, as `sweep` starts it: trained unless it is completed or failed, or
    another process trains it now (then skipped); resumed where it was interrupted."""
    from .commands import sweep as sweep_mod

    session, skipped = sweep_mod.work(Path(sweep_dir), name, retry_failed)
    if session is None:
        say(skipped)
        return
    _train(session, quiet=True)


def warn_edited(run_dir: Path, note: str | None) -> None:
    """One warning line where config.yaml no longer says what run.h5 records (`note`, from
    store.edited): the readers answer from run.h5."""
    if note:
        say(f"warning: {Path(run_dir) / store.CONFIG_FILE} was edited ({note}); showing the run as run.h5 records it")


@app.command()
@user_errors
def bench(
    device: str = typer.Option("auto", "--device", help="auto, cpu, gpu or gpu:N."),
    quick: bool = typer.Option(False, "--quick", help="Fewer steps per case, and widths up to 250 in the scaling table (a smoke run)."),
    json_path: Path = typer.Option(Path("bench.json"), "--json", help="Where to write the figures as JSON."),
    net: str = typer.Option("mlp", "--net", help="mlp: edge-popup against dense on MLPs; lenet, resnet20: the training step "
                            "of configs/mnist_NET.yaml, split by layer kind and phase."),
    engine: str = typer.Option(None, "--conv-engine", help="With --net lenet or resnet20: auto, im2col or torch "
                               "(train.conv_engine) instead of the config's."),
) -> None:
    """Measure seconds per epoch and samples/s of edge-popup and dense training (a benchmark, not a test)."""
    from .commands import bench as bench_mod  # only this command needs it

    if net not in bench_mod.NETS:
        raise ConfigError(f"--net: expected one of {', '.join(bench_mod.NETS)}, got {net!r}")
    if engine is not None and (net == "mlp" or engine not in config_mod.CONV_ENGINES):
        raise ConfigError(f"--conv-engine: expected one of {', '.join(config_mod.CONV_ENGINES)} with --net lenet or resnet20, "
                          f"got {engine!r} with --net {net}")
    cfg = config_mod.validate(config_mod.Config(device=device))
    if net != "mlp":
        cfg = bench_mod.recipe(net)
    writable_file(json_path, "--json")  # before the benchmark, not after minutes of it
    backend = resolve(device)
    dd = load_data(cfg, backend)
    if net == "mlp":
        results = bench_mod.run(backend, dd.x_train, dd.y_train, quick, console)
    else:
        results = bench_mod.run_net(backend, dd.x_train, dd.y_train, net, quick, console, engine)
    try:
        store.write_atomic(json_path, lambda p: p.write_text(json.dumps(results, indent=1)))
    except OSError as e:
        raise ScoretrainError(f"{json_path}: cannot write the figures ({os_reason(e)}); they are printed above") from None
    console.print(f"figures written to {json_path}")


def writable_file(path: Path, option: str) -> None:
    """A ConfigError unless `path` names a file that can be created or replaced."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name, e.g. {path / 'bench.json'}")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: no such folder {path.parent}")
    if not os.access(path.parent, os.W_OK):  # also false on a read-only file system, for root too
        raise ConfigError(f"{option} {path}: cannot write into {path.parent}")


@app.command("eval")
@user_errors
def eval_(
    run_dir: Path = typer.Argument(..., help="A run directory written by `fit`, or a FILE.ticket (export --to).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, gpu or gpu:N (default: the run's; a ticket's: cpu)."),
    other_data: Optional[Path] = typer.Option(None, "--data", help="Measure on the test split of other data (an .npz/HDF5 file or an image folder, as data.path) of the same image shape and classes.", show_default=False),
) -> None:
    """Reload a run (or a ticket, its weights regenerated from its seed) and re-measure its stored network on the test split."""
    if device is not None:
        config_mod.validate(config_mod.Config(device=device))
    result = api.measure(run_dir, device, other_data)
    warn_edited(run_dir, result["config_edited"])
    if as_json:
        emit(json.dumps(result) + "\n")
    else:
        _eval_table(run_dir, result)
    if result["matches_record"] is False:  # a record that its own network does not reproduce: not believed
        say(f"error: {run_dir}: the re-measured test accuracy {100 * result['test_acc']:.2f}% differs from the recorded "
            f"{100 * result['recorded_test_acc']:.2f}%: its files were changed or damaged, or it was measured on another "
            "device or library than it was trained on (eval --json shows both)")
        raise typer.Exit(1)


def _eval_table(run_dir: Path, result: dict) -> None:
    table = Table(title=f"eval {run_dir}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", f"{result['status']} ({result['epochs']} epoch{'' if result['epochs'] == 1 else 's'})")
    table.add_row("test acc", f"{100 * result['test_acc']:.2f}%  (loss {result['test_loss']:.4f}, {result['test_samples']} samples of {result['data']})")
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
    sort: str = typer.Option("k", "--sort", help="k (default: a K sweep in order of k), name, method, widths, init, epochs, status, best, final, val (test accuracy at the best validation epoch) or seconds. Accuracies sort best first, the rest ascending; ties by name; runs without the value last."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV for scripts (full precision)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of rows for scripts (full precision)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw final test accuracy against k and test accuracy per epoch into FILE.png or FILE.svg (needs: pip install 'scoretrain\\[plot]').", show_default=False, metavar="FILE"),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="One row per value of these config keys, KEY[,KEY] (e.g. model.k, or model.method,model.k): n, mean ± std over the group's runs (seeds) of the final and best test accuracy (at the best validation epoch where runs have a validation split), s/epoch. --plot then draws the mean final accuracy with error bars against the first key.", show_default=False, metavar="KEY[,KEY]"),
) -> None:
    """Compare runs side by side: method, widths, k, epochs, status, best and final test accuracy, s/epoch.

    Reads only run.h5's metrics and attributes (fast, also on runs still training). A run that is
    not readable is an error (exit 1) when named itself; inside a folder of runs it is listed with
    status unreadable (the reason in --csv/--json and on stderr), and the others are still shown.
    """
    from .commands import compare as compare_mod

    if as_csv and as_json:
        raise ConfigError("--csv and --json: choose one")
    compare_mod.sort_rows([], sort)  # refuses an unknown --sort before any file is read
    if plot is not None:
        from .commands import plot as plot_mod

        plot_mod.check(plot)  # likewise a bad file name, or no matplotlib
    keys = compare_mod.check_keys([k.strip() for k in group_by.split(",")]) if group_by is not None else ()
    rows = compare_mod.sort_rows(compare_mod.collect(paths, keys), sort)
    if keys:
        _compare_groups(rows, keys, as_csv, as_json, plot)
        return
    for row in rows:
        if row["edited"]:
            warn_edited(Path(row["path"]), row["edited"])
    if as_json or as_csv:
        emit(compare_mod.to_json(rows) + "\n" if as_json else compare_mod.to_csv(rows))
    else:
        compare_mod.print_table(console, rows)
        for row in rows:
            if row["error"]:
                say(f"unreadable: {row['error']}")
    if plot is not None:
        plot_mod.plot(rows, plot)
        say(f"plot written to {plot}")  # stderr: --json/--csv stay clean


def _compare_groups(rows: list[dict], keys: tuple, as_csv: bool, as_json: bool, plot: Optional[Path]) -> None:
    from .commands import compare as compare_mod

    for row in rows:
        if row["error"]:
            say(f"unreadable: {row['error']}")
    grouped = compare_mod.groups(rows, keys)
    warning = compare_mod.pooled_warning(grouped, keys)
    if warning:
        say(warning)
    if as_json:
        emit(json.dumps(grouped, indent=2) + "\n")
    elif as_csv:
        emit(compare_mod.group_csv(grouped, keys))
    else:
        compare_mod.print_wide(console, compare_mod.group_table(grouped, keys))
    if plot is not None:
        from .commands import plot as plot_mod

        plot_mod.plot_groups(grouped, keys, plot)
        say(f"plot written to {plot}")


@app.command("inspect")
@user_errors
def inspect_(
    run_dir: Path = typer.Argument(..., help="A run directory written by `fit`, or a FILE.ticket (export --to).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Per layer: kept fraction, how far the mask moved, score statistics, sign balance of the kept weights."""
    from .commands import inspect_run

    report = inspect_run.inspect(run_dir)
    warn_edited(run_dir, report["config_edited"])
    if as_json:
        emit(json.dumps(report) + "\n")
        return
    inspect_run.print_report(console, report)


@app.command()
@user_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by `fit`.", show_default=False),
    to: Path = typer.Option(..., "--to", help="The file to write (its folder is created if missing): FILE.npz (NumPy), FILE.safetensors, FILE.onnx (an ONNX model; pip install 'scoretrain\\[onnx]'), or FILE.ticket (kilobytes: the seed, 1-bit masks, BatchNorm state; `eval FILE.ticket` regenerates the weights).", show_default=False, metavar="FILE"),
    force: bool = typer.Option(False, "--force", help="Overwrite FILE if it exists."),
    layout: str = typer.Option("scoretrain", "--layout", help="scoretrain (weight_NN, channels last), or torch-prune (a .safetensors "
                               "in torch.nn.utils.prune's names and layouts: <layer>.weight_orig, <layer>.weight_mask, BatchNorm's running stats)."),
) -> None:
    """Write the subnetwork as plain masked weight arrays + architecture in one .npz or .safetensors file, or as an ONNX model (docs/run-format.md)."""
    from .commands import export as export_mod

    out, edited = export_mod.export(run_dir, to, force, layout)
    warn_edited(run_dir, edited)
    n = sum(int((a != 0).sum()) for key, a in out.items() if key.startswith("weight_"))
    console.print(f"{to}: {sum(k.startswith('weight_') for k in out)} weight layers, {n:,} nonzero weights", soft_wrap=True, markup=False)


# ----------------------------------------------------------------------------- scoretrain config

config_app = typer.Typer(no_args_is_help=True, context_settings=HELP, help="The experiment spec, resolved (docs/spec.md explains each key).")


@config_app.command("show")
@user_errors
def config_show(
    config: Path = typer.Argument(..., help="Experiment spec (YAML), e.g. configs/mnist_fc.yaml.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted key=value overrides, as for fit.", show_default=False),
) -> None:
    """Print the spec a `fit` of CONFIG with these overrides would train (defaults filled in, validated), without training."""
    cfg = config_mod.load(config, overrides or [])
    if cfg.data.path is not None:  # checked against its data's shape and classes, as fit does (the layers written out)
        from .run.resources import source

        config_mod.check_data(cfg, source(cfg).info())
    emit(config_mod.show(cfg))


app.add_typer(config_app, name="config")


# ----------------------------------------------------------------------------- scoretrain data

from .data import datasets as data_mod  # noqa: E402 - kept with the commands that use it

data_app = typer.Typer(no_args_is_help=True, context_settings=HELP, help="Download, verify and list the datasets.")


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


def _terminate(signum, frame):
    """SIGTERM, outside fit's training loop (which stops between batches): unwind like Ctrl-C, so
    that the temporary files of a write in progress (export, a download) are removed."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # a usage error (unknown option, missing argument): one line too
        command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in typer.main.get_command(app).commands else ""
        err_console.print(f"error: {e.format_message()} (see: scoretrain {command} --help)".replace("  ", " "), soft_wrap=True, markup=False)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    sys.exit(code or 0)
