"""`scoretrain sweep`: a grid of runs of one base config, trained on a local pool of processes or
as a Slurm job array, into one folder.

The run store is the ledger. Each run has a fixed name from its grid values (`k0.3-seed1`) and
its own folder in the sweep's folder; the sweep's record (`sweep.yaml` there) holds the base
config, the grid and every run's overrides, so that running the same sweep again knows which
runs are done. Every run is trained by a worker (`scoretrain sweep-worker DIR NAME`, a process of
its own): it takes the run folder's lock (store.claim, a flock the kernel drops when its process
dies), and only with the lock held decides what to do: nothing if the run is completed or
failed, `fit --resume` if it was interrupted, a fresh fit if it never started. A second worker
of the same run (a second sweep command over the folder, a requeued Slurm task) finds the lock
taken and skips the run: nothing is trained twice.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import yaml

from ..run import config as config_mod
from ..run import lifecycle, store
from ..errors import ConfigError, RunError, ScoretrainError

RECORD = "sweep.yaml"
FORMAT = "scoretrain-sweep"
LOGS = ".logs"  # each worker's output, NAME.log: a dot folder, which compare does not take for a run
SLURM_DIR = ".slurm"  # submitit's job files
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
DONE = ("completed", "failed", "unreadable")  # states a worker leaves alone (failed ones: unless --retry-failed)


# --- the grid --------------------------------------------------------------------------------


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets, braces and quotes: `0.1,0.3` is two values,
    `[784,500,10]` one."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


MAX_RUNS = 10_000  # runs in one sweep: a grid larger than this is a typo more often than a plan


def _range(key: str, text: str) -> list | None:
    """The integers of `a:b[:step]` (a, a+step, ... below b); None where `text` is not of that
    form. A range of other numbers is refused with the list to give instead, as is one of more
    than MAX_RUNS values (before any of them is made)."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3):
        return None
    try:
        nums = [Decimal(p.strip()) for p in parts]
    except InvalidOperation:
        return None
    if not all(n.is_finite() for n in nums):
        return None
    a, b, step = nums if len(nums) == 3 else (*nums, Decimal(1))
    if step <= 0:
        raise ConfigError(f"{key}={text}: a range's step must be at least 1")
    count = max(0, math.ceil((b - a) / step))
    if count > MAX_RUNS:
        raise ConfigError(f"{key}={text}: {count:,} values, more than the {MAX_RUNS:,} runs a sweep may have; split the grid into several sweeps")
    if not all(n == n.to_integral_value() for n in (a, b, step)):
        listed = ",".join(f"{(a + i * step).normalize():f}" for i in range(min(count, 8)))
        example = f"{key}={listed}{',...' if count > 8 else ''}" if count else f"{key}=v1,v2"
        raise ConfigError(f"{key}={text}: a range a:b[:step] takes integers; list the values instead: {example}")
    return list(range(int(a), int(b), int(step)))


def _values(key: str, text: str) -> list | None:
    """The values of a grid axis given as text: `a:b[:step]` (integers a, a+step, ... < b) or
    comma-separated YAML values; None for a single value (a fixed override)."""
    values = _range(key, text)
    if values is not None:
        return values
    parts = _split_top(text)
    if len(parts) == 1:
        return None
    out = []
    for p in parts:
        try:
            out.append(config_mod.parse_yaml(p))
        except yaml.YAMLError:
            raise ConfigError(f"{key}={text}: {p!r} is not a valid YAML value") from None
    return out


@dataclass
class Grid:
    """The fixed overrides (key=value strings, as `fit` takes them) and the axes, key -> values,
    in the order given."""

    fixed: list[str] = field(default_factory=list)
    axes: dict[str, list] = field(default_factory=dict)

    def _drop(self, key: str) -> None:
        """Forget `key`: given again (the command line after the YAML), it moves last and wins."""
        self.axes.pop(key, None)
        self.fixed = [o for o in self.fixed if o.split("=", 1)[0].strip() != key]

    def fix(self, key: str, text: str) -> None:
        """A fixed override, its value as given (YAML text)."""
        self._drop(key)
        self.fixed.append(f"{key}={text}")

    def add(self, key: str, values) -> None:
        self._drop(key)
        if isinstance(values, list):
            if not values:
                raise ConfigError(f"{key}: the grid gives it no values (an empty list or range)")
            self.axes[key] = values
        else:
            self.fixed.append(f"{key}={_dump_value(values)}")


def _dump_value(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _flat(section: dict, prefix: str = ""):
    """(dotted key, value) of a `sweep:` section, nested mappings written out: {model: {k: [..]}}
    is model.k."""
    for key, value in section.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def parse(base: dict, overrides: list[str]) -> Grid:
    """The grid from the base config's `sweep:` section (key: list, "a:b" or a single value;
    nested mappings allowed) and the command line's key=value arguments, the command line
    winning over the section; a key given twice on the command line is refused."""
    grid = Grid()
    section = base.get("sweep") or {}
    if not isinstance(section, dict):
        raise ConfigError("sweep: expected a mapping of dotted keys to lists of values, e.g. {model.k: [0.1, 0.5]}")
    for key, value in _flat(section):
        if isinstance(value, str) and _range(key, value) is not None:
            value = _range(key, value)
        grid.add(key, value)
    given = {}
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"'{o}': expected key=value or key=v1,v2,... (e.g. model.k=0.1,0.3 seed=0:3)")
        key, text = (s.strip() for s in o.split("=", 1))
        if key in given:
            raise ConfigError(f"{key} is given twice ({given[key]} and {o}): give it once, with all its values (key=v1,v2,...)")
        given[key] = o
        values = _values(key, text)
        if values is None:
            grid.fix(key, text)
        else:
            grid.add(key, values)
    if not grid.axes:
        raise ConfigError("the grid is empty: give at least one key with several values (model.k=0.1,0.3) or a range (seed=0:3)")
    size = math.prod(len(v) for v in grid.axes.values())
    if size > MAX_RUNS:
        raise ConfigError(f"the grid has {size:,} runs ({' x '.join(f'{len(v)} {k}' for k, v in grid.axes.items())}), more than the "
                          f"{MAX_RUNS:,} a sweep may have; split it into several sweeps")
    return grid


def _name_part(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "x".join(_name_part(v) for v in value)
    return str(value)


NAME_LIMIT = 120  # bytes of a run's name (the file system's limit is 255, and .logs/NAME.log adds to it)


def _short(name: str) -> str:
    """A name within NAME_LIMIT: a longer one is cut and ends in a digest of the whole, so that
    it stays unique and the same on every run of the command (sweep.yaml keeps its overrides)."""
    if len(name.encode()) <= NAME_LIMIT:
        return name
    return f"{name[:NAME_LIMIT - 13]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def run_names(grid: Grid) -> dict[str, list[str]]:
    """Every run of the grid: its name -> its overrides (fixed first, then its grid values). The
    name is each axis's last key part and value, `k0.3-seed1`: the full key where two axes
    share a last part; a name too long for a folder is shortened (_short)."""
    last = [k.rsplit(".", 1)[-1] for k in grid.axes]
    labels = [k.rsplit(".", 1)[-1] if last.count(k.rsplit(".", 1)[-1]) == 1 else k.replace(".", "_") for k in grid.axes]
    runs = {}
    for combo in itertools.product(*grid.axes.values()):
        name = "-".join(f"{label}{_name_part(v)}" for label, v in zip(labels, combo))
        name = _short(re.sub(r"[^A-Za-z0-9._=+-]", "_", name))
        overrides = grid.fixed + [f"{k}={_dump_value(v)}" for k, v in zip(grid.axes, combo)]
        if name in runs:
            raise ConfigError(f"two runs of the grid would both be named {name!r} ({' '.join(runs[name][len(grid.fixed):])} "
                              f"and {' '.join(overrides[len(grid.fixed):])}): give each value once")
        runs[name] = overrides
    return runs


# --- the record --------------------------------------------------------------------------------


@dataclass
class Sweep:
    """A sweep's record: its base config (the YAML mapping, without `sweep:`), where it came
    from, and its runs (name -> overrides)."""

    base: dict
    source: str
    runs: dict[str, list[str]]
    grids: list = field(default_factory=list)  # each grid the runs came from: {"fixed": [...], "axes": {...}}
    launcher: dict = field(default_factory=dict)  # how it was last launched (informative)

    def config(self, name: str) -> config_mod.Config:
        if name not in self.runs:
            raise RunError(f"{name}: not a run of this sweep (its runs: {', '.join(self.runs)})")
        raw = copy.deepcopy(self.base)
        for o in self.runs[name]:
            config_mod.apply_override(raw, o)
        try:
            return config_mod.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"run {name} ({' '.join(self.runs[name])}): {e}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump({"format": FORMAT, "version": 1, "source": self.source, "base": self.base,
                               "grids": self.grids, "launcher": self.launcher, "runs": self.runs},
                              sort_keys=False, default_flow_style=None)


def plan(config: Path, overrides: list[str]) -> Sweep:
    """The sweep a command line asks for, every run's spec validated (a ConfigError names the run)."""
    base = config_mod.read_yaml(config)
    grid = parse(base, overrides)
    base = {k: v for k, v in base.items() if k != "sweep"}
    sweep = Sweep(base, str(config), run_names(grid), [{"fixed": grid.fixed, "axes": grid.axes}])
    specs = {}
    for name in sweep.runs:
        spec = config_mod.dump(sweep.config(name))
        if spec in specs:  # e.g. train.lr=0.1,1e-1: two names, one spec
            first = specs[spec]
            raise ConfigError(f"runs {first} ({' '.join(sweep.runs[first][len(grid.fixed):])}) and {name} "
                              f"({' '.join(sweep.runs[name][len(grid.fixed):])}) are the same spec: give each value once")
        specs[spec] = name
    return sweep


def check_data(sweep: Sweep) -> None:
    """Read the data of the sweep's runs once for each data section they have, as a run reads it:
    missing files, a sample count beyond the data, a recalibration larger than the training set
    refuse the sweep (naming a run) before any folder is made, where a worker would fail on each
    run; a dataset to download is downloaded once, not by every worker at the same time."""
    from ..kernels.backend import Backend
    from ..run.resources import load_data

    import numpy as np

    seen = set()
    for name in sweep.runs:
        cfg = sweep.config(name)
        key = json.dumps([dataclasses.asdict(cfg.data), cfg.train.bn_recalibration], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            load_data(cfg, Backend(np, "cpu"))
        except ScoretrainError as e:
            raise type(e)(f"run {name} ({' '.join(sweep.runs[name])}): {e}") from None


def read(sweep_dir: Path) -> Sweep:
    path = Path(sweep_dir) / RECORD
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{sweep_dir}: not a sweep folder (no {RECORD}; `scoretrain sweep CONFIG ... --runs-dir {sweep_dir}` makes one)") from None
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f"{path}: cannot read the sweep's record ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("runs"), dict):
        raise RunError(f"{path}: not a scoretrain sweep record")
    return Sweep(raw["base"], raw.get("source", ""), {k: list(v) for k, v in raw["runs"].items()},
                 list(raw.get("grids") or []), dict(raw.get("launcher") or {}))


def merge(sweep_dir: Path, old: Sweep, sweep: Sweep, extend: bool) -> Sweep:
    """The record of a sweep folder once this sweep goes into it: refused (RunError) unless it has
    the same base and the same runs, or (--extend) new runs added to those it has."""
    if old.base != sweep.base:
        raise RunError(f"{sweep_dir}: a sweep of another base config ({old.source}) is in this folder: give this one its own --runs-dir")
    changed = [n for n in sweep.runs if n in old.runs and sorted(old.runs[n]) != sorted(sweep.runs[n])]  # (each key once: order is no matter)
    if changed:
        n = changed[0]
        raise RunError(f"{sweep_dir}: its run {n} has the overrides {' '.join(old.runs[n])}, this sweep's {' '.join(sweep.runs[n])}: "
                       "give this sweep its own --runs-dir")
    if set(sweep.runs) != set(old.runs) and not extend:
        extra, missing = len(set(sweep.runs) - set(old.runs)), len(set(old.runs) - set(sweep.runs))
        raise RunError(f"{sweep_dir}: a sweep of another grid is in this folder ({extra} runs new here, {missing} not in this grid): "
                       "add --extend to add this grid's runs to it, or give it its own --runs-dir")
    new_runs = {n: o for n, o in sweep.runs.items() if n not in old.runs}
    grids = old.grids + [g for g in sweep.grids if g not in old.grids and new_runs]
    return Sweep(old.base, old.source, {**old.runs, **new_runs}, grids, sweep.launcher or old.launcher)


def check_folder(sweep_dir: Path, sweep: Sweep, extend: bool) -> None:
    """A RunError where the sweep cannot go into sweep_dir, found without writing anything: the
    folder must be new, empty, or a sweep folder whose record this sweep fits (merge)."""
    sweep_dir = Path(sweep_dir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise RunError(f"{sweep_dir}: --runs-dir is a file, not a folder: give the sweep a folder of its own")
    kind = store.folder_kind(sweep_dir)
    if kind == "a sweep folder" and (sweep_dir / RECORD).stat().st_size:
        merge(sweep_dir, read(sweep_dir), sweep, extend)
    elif kind not in (None, "a sweep folder"):
        raise RunError(f"{sweep_dir}: --runs-dir is {kind}, not a sweep folder: give the sweep a new or empty folder of its own")


@dataclass
class Settled:
    """A sweep folder's record as settle left it, and how to take back what settle changed."""

    record: Sweep
    made: list[Path]  # the files and folders settle created, deepest first
    before: bytes | None = None  # the record's bytes before settle rewrote them (None: unchanged or new)

    def make(self, folder: Path) -> None:
        """mkdir `folder` (in the sweep folder), to be removed again by undo where it is new."""
        if not folder.is_dir():
            folder.mkdir()
            self.made.insert(0, folder)

    def undo(self, sweep_dir: Path) -> None:
        """Take back a sweep folder that no run has started in (a refused job array): the record
        as it was, and every file and folder this command made there."""
        path = Path(sweep_dir) / RECORD
        if self.before is not None:
            path.write_bytes(self.before)
        for p in self.made:  # deepest first
            if p.name in (SLURM_DIR, LOGS):  # made by this command: only its own files are in them
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir():
                store.remove_folders([p])
            else:
                p.unlink(missing_ok=True)


def settle(sweep_dir: Path, sweep: Sweep, extend: bool) -> Settled:
    """Write the record of a new sweep folder, or check the folder's against this sweep (merge).
    Two sweep commands at once settle one record: it is created with O_CREAT and changed only
    under its lock. Refused (check_folder) before anything is made."""
    sweep_dir = Path(sweep_dir)
    check_folder(sweep_dir, sweep, extend)
    path = sweep_dir / RECORD
    made = store.missing_parents(sweep_dir)
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        store.remove_folders(made)
        raise RunError(f"{sweep_dir}: cannot create the sweep folder ({e.strerror or e}); choose another --runs-dir") from None
    new = not path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        store.remove_folders(made)
        raise RunError(f"{path}: cannot write the sweep's record ({e.strerror or e}); choose another --runs-dir") from None
    made = [path, *made] if new else made
    settled = Settled(sweep, made)
    try:
        _lock(fd)
        text = os.read(fd, 1 << 24)
        if text.strip():
            old = read(sweep_dir)
            merged = merge(sweep_dir, old, sweep, extend)
            if merged == old:
                return Settled(old, made)
            settled = Settled(merged, made, text)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, settled.record.to_yaml().encode())
        os.fsync(fd)
        return settled
    except BaseException as e:
        settled.undo(sweep_dir)
        if isinstance(e, OSError):
            raise RunError(f"{path}: cannot write the sweep's record ({e.strerror or e})") from None
        raise
    finally:
        os.close(fd)


def _lock(fd: int) -> None:
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):  # no flock here: best effort
        pass


# --- the state of each run, from the run store ------------------------------------------------


def state(run_dir: Path) -> tuple[str, int, int, float | None]:
    """(state, epochs done, epochs, final test accuracy) of a run folder: missing, running (a
    live process holds it), completed, failed, interrupted (killed, or stopped), or unreadable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "missing", 0, 0, None
    if store.held(run_dir):
        try:
            run = store.load_summary(run_dir)
            return "running", run.epochs_done, _epochs(run), _final(run)
        except ScoretrainError:
            return "running", 0, 0, None
    if not (run_dir / store.RUN_FILE).exists():
        return "interrupted", 0, 0, None  # killed before its first checkpoint: the worker starts it over
    try:
        run = store.load_summary(run_dir)
    except ScoretrainError:
        return "unreadable", 0, 0, None
    status = store.live_status(run)
    status = "interrupted" if status in ("running", "unknown") else status  # nobody holds it: its process is gone
    return status, run.epochs_done, _epochs(run), _final(run)


def _epochs(run: store.Run) -> int:
    try:
        return config_mod.from_text(run.attrs.get("spec", ""), "run.h5").train.epochs
    except ScoretrainError:
        return 0


def _final(run: store.Run) -> float | None:
    acc = run.metrics.get("test_acc") or []
    return acc[-1] if acc else None


def states(sweep_dir: Path, sweep: Sweep) -> dict[str, tuple]:
    return {name: state(Path(sweep_dir) / name) for name in sweep.runs}


def why(run_dir: Path, st: str) -> str | None:
    """The one-line reason of a run that did not complete: a failed run's recorded message, what
    makes a run unreadable, or the error its worker last printed (.logs/NAME.log) where the run
    never got as far as a checkpoint; None where there is none to give."""
    run_dir = Path(run_dir)
    if st == "failed":
        try:
            return store.load_summary(run_dir).attrs.get("message") or None
        except ScoretrainError as e:
            return str(e)
    if st == "unreadable":
        try:
            store.load_summary(run_dir)
        except ScoretrainError as e:
            return str(e)
        return None
    if st in ("missing", "interrupted"):
        try:
            lines = (run_dir.parent / LOGS / f"{run_dir.name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return None
        last = next((line for line in reversed(lines) if line.strip()), "")
        return last.removeprefix("error: ") if last.startswith("error: ") else None
    return None


# --- the worker: one run, exactly once -----------------------------------------------------------


def take(sweep_dir: Path, name: str, retry_failed: bool = False) -> str | None:
    """Claim run `name`'s folder for this process (creating it): None if another process holds
    it, else what to do with it, decided under the lock: "skip" (completed, failed unless
    `retry_failed`, or unreadable), "resume" or "fresh". The caller releases the claim
    (store.release) when it is done."""
    run_dir = Path(sweep_dir) / name
    try:
        run_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise RunError(f"{run_dir}: cannot create the run folder ({e.strerror or e})") from None
    try:
        store.claim(run_dir)
    except RunError:
        return None
    what = state(run_dir)[0]
    if what in DONE and not (retry_failed and what == "failed"):
        return "skip"
    if (run_dir / store.RUN_FILE).exists() or (run_dir / store.CONFIG_FILE).exists():
        return "resume"
    return "fresh"


def worker_command(sweep_dir: Path, name: str, retry_failed: bool = False) -> list[str]:
    return [sys.executable, "-m", "scoretrain", "sweep-worker", str(sweep_dir), name, *(["--retry-failed"] if retry_failed else [])]


def worker_env(threads: int, gpu: str | None = None) -> dict:
    """The environment of a worker: its BLAS (and numba) threads, and its GPU where it has one."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{v: str(threads) for v in THREAD_VARS})  # unbuffered: the log is live
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _stop_with_parent() -> None:
    """In a worker, before it starts: SIGTERM when the sweep command dies, however it dies
    (SIGKILL included), so that no run trains on unwatched; SIGTERM stops it between batches,
    resumable (Linux's PR_SET_PDEATHSIG; elsewhere the workers run on)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --- the local pool -----------------------------------------------------------------------------


def run_local(sweep_dir: Path, names: list[str], jobs: int, gpus: list[str] | None, on_event,
              retry_failed: bool = False) -> dict[str, int]:
    """Train `names` with `jobs` worker processes at a time (one per GPU with `gpus`; never more
    than there are runs), each with cores/jobs BLAS threads (cores/GPUs with `gpus`), so that the
    runs do not fight over the cores. The threads follow from the command alone, not from how
    many runs are left: the sum order, and so the bits, depend on them, and the same command
    resumes a sweep to the bits of an uninterrupted one. on_event(name, what,
    code) is told of each start ("start") and end ("end", the exit code); it is also called with
    ("", "tick", None) about twice a second, for a live display. The workers' output goes to
    .logs/NAME.log. Returns each run's exit code."""
    sweep_dir = Path(sweep_dir)
    (sweep_dir / LOGS).mkdir(exist_ok=True)
    slots = list(gpus) if gpus else [None] * min(jobs, len(names))
    threads = max(1, cores() // (len(gpus) if gpus else jobs))
    pending, running, codes = list(names), {}, {}
    try:
        while pending or running:
            free = [s for s in range(len(slots)) if s not in {slot for slot, _ in running.values()}]
            while pending and free:
                name, slot = pending.pop(0), free.pop(0)
                log = open(sweep_dir / LOGS / f"{name}.log", "ab")
                proc = subprocess.Popen(worker_command(sweep_dir, name, retry_failed), env=worker_env(threads, slots[slot]),
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=_stop_with_parent)
                log.close()
                running[proc] = (slot, name)
                on_event(name, "start", None)
            time.sleep(0.25)
            for proc in [p for p in running if p.poll() is not None]:
                _, name = running.pop(proc)
                codes[name] = proc.returncode
                on_event(name, "end", proc.returncode)
            on_event("", "tick", None)
    finally:  # Ctrl-C or SIGTERM: stop the workers too (each stops between batches, its run resumable)
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return codes


# --- Slurm, through submitit ---------------------------------------------------------------------


SLURM_INSTALL = "pip install 'scoretrain[slurm]'"


def check_slurm() -> None:
    """A Slurm launcher needs sbatch on PATH and submitit: both checked before anything starts."""
    if shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm: sbatch is not on PATH (run on the cluster's login node, or use --launcher local)")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ConfigError(f"--launcher slurm needs submitit, which is not installed: {SLURM_INSTALL}") from None
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-u", str(os.getuid())], capture_output=True, text=True, timeout=60)
        said, down = (out.stderr.strip().splitlines() or [""])[-1], out.returncode != 0
    except (OSError, subprocess.TimeoutExpired) as e:
        down, said = True, str(e)
    if down:
        raise RunError(f"--launcher slurm: Slurm does not answer (squeue: {said or 'no reply'}): "
                       "try again once its controller is up, or use --launcher local")


def run_member(sweep_dir: str, name: str, retry_failed: bool = False) -> int:
    """What one task of the Slurm job array runs: the worker, as the local pool runs it."""
    with open(Path(sweep_dir) / LOGS / f"{name}.log", "ab") as log:
        return subprocess.call(worker_command(Path(sweep_dir), name, retry_failed), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))  # (threads: the job's setup)


@dataclass
class SlurmSettings:
    partition: str | None = None
    time: int = 60  # minutes
    cpus_per_run: int = 1
    gpus_per_run: int = 0
    mem: str | None = None  # e.g. 8G
    array_parallelism: int = 256
    extra: dict = field(default_factory=dict)  # --slurm KEY=VALUE


def submit(sweep_dir: Path, names: list[str], s: SlurmSettings, retry_failed: bool = False) -> str:
    """Submit `names` as one Slurm job array; returns its job id. sbatch's own complaints are
    caught (its stderr, which submitit passes through) and said in the one-line RunError."""
    import submitit

    sweep_dir = Path(sweep_dir).resolve()
    (sweep_dir / LOGS).mkdir(exist_ok=True)
    ex = submitit.SlurmExecutor(folder=sweep_dir / SLURM_DIR / "%j", python=sys.executable)
    params = dict(time=s.time, cpus_per_task=s.cpus_per_run, array_parallelism=s.array_parallelism,
                  job_name=f"scoretrain-{sweep_dir.name}", signal_delay_s=60,
                  setup=[f"export {v}={s.cpus_per_run}" for v in THREAD_VARS])
    if s.partition:
        params["partition"] = s.partition
    if s.gpus_per_run:
        params["gpus_per_task"] = s.gpus_per_run
    if s.mem:
        params["mem"] = s.mem
    if s.extra:
        params["additional_parameters"] = dict(s.extra)
    with tempfile.TemporaryFile() as said, _stderr_to(said):
        try:
            ex.update_parameters(**params)
            jobs = ex.map_array(run_member, [str(sweep_dir)] * len(names), names, [retry_failed] * len(names))
        except Exception as e:  # sbatch refused it (an unknown partition, a bad --slurm key, no controller): one line
            said.seek(0)
            lines = [line for line in said.read().decode(errors="replace").splitlines() if line.strip()]
            msg = " ".join((lines[-1] if lines else str(e)).split())
            raise RunError(f"Slurm refused the job array: {msg[:400]}") from None
    return jobs[0].job_id.split("_")[0]


@contextlib.contextmanager
def _stderr_to(file):
    """Point this process's stderr (file descriptor 2, which subprocesses inherit) at `file`."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def queued(job_id: str) -> int:
    """How many tasks of a job array squeue still lists (pending or running); squeue, not sacct,
    which many clusters disable."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i"], capture_output=True, text=True)
    if out.returncode != 0:
        return 0  # squeue forgets a job soon after it ends, and then says it is invalid
    return len(out.stdout.split())


def work(sweep_dir: Path, name: str, retry_failed: bool = False) -> tuple[lifecycle.Session | None, str | None]:
    """One run of a sweep, as its worker takes it: (a claimed session to train, None), or (None,
    why there is nothing to train: another process trains it, or it is completed, failed or
    unreadable). A run that cannot start leaves no folder behind."""
    run_dir = Path(sweep_dir) / name
    cfg = read(sweep_dir).config(name)
    what = take(sweep_dir, name, retry_failed)
    if what is None:
        return None, f"{run_dir}: another process trains this run; skipped"
    try:
        if what == "skip":
            store.release(run_dir)
            return None, f"{run_dir}: already {state(run_dir)[0]}; skipped"
        if what == "resume":
            return lifecycle.reopen(run_dir, locked=True), None
        return lifecycle.begin_in(cfg, run_dir), None
    except BaseException:
        if what == "fresh":
            store.remove_unstarted(run_dir)
        store.release(run_dir)
        raise
