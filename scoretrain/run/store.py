"""The run directory: `config.yaml` (the resolved spec) and `run.h5` (see docs/run-format.md).

Run directories are created with a single mkdir, so parallel `fit`s never share one and an
existing run is never overwritten. `run.h5` is only ever replaced whole: each checkpoint is
written to a temporary file in the same folder, flushed to disk and renamed over the old
one, so a kill at any moment leaves the previous complete file, and readers never see a
half-written one.
"""

from __future__ import annotations

import datetime as dt
import math
import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from . import config as config_mod
from ..errors import ConfigError, RunError
from ..nn.methods import METHODS
from ..nn.layers import norm_layers, weight_layers
from ..nn.model import build_layers, score_shape
from .resources import data_info

try:
    import fcntl
except ImportError:  # not POSIX: no run locks
    fcntl = None

FORMAT = "scoretrain-run"
FORMAT_VERSION = 1
RUN_FILE = "run.h5"
CONFIG_FILE = "config.yaml"
METRICS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "mask_change", "val_loss", "val_acc")
OPTIONAL_METRICS = ("val_loss", "val_acc")  # added in 0.2: nan in the runs written before
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")  # fullmatch: `$` would let a final newline through
NAME_MAX = 255  # bytes in a file name, on the usual file systems


@dataclass
class Run:
    """Everything in run.h5, on the host."""

    attrs: dict  # root attributes: status, seed, backend, input_mean, ...
    weights: list[np.ndarray]
    scores: list[np.ndarray] | None = None
    masks: list[np.ndarray] | None = None
    k: float = 1.0
    metrics: dict[str, list] = field(default_factory=lambda: {m: [] for m in METRICS})
    optimizer: dict | None = None  # {"name", "steps", "slots": {slot: [arrays]}}
    norms: list[np.ndarray] | None = None  # each BatchNorm's [mean, var(, gamma, beta)] ([2 or 4, C]); None: no BatchNorm, or none yet
    mask_change_layers: list[list[float]] = field(default_factory=list)  # per epoch, per layer
    epochs_saved: int | None = None  # epochs in the run.h5 on disk, as last written or read (None: no file yet)
    edited: str | None = None  # open_run: where config.yaml no longer says what run.h5 records (see edited())

    @property
    def epochs_done(self) -> int:
        return len(self.metrics["epoch"])


# --- the directory ----------------------------------------------------------------------------


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


SWEEP_RECORD = "sweep.yaml"  # what makes a folder a sweep's (commands/sweep.py)


def folder_kind(path: Path) -> str | None:
    """What an existing folder holds, for a command about to write into it: "a run folder", "a
    sweep folder", "a dataset folder", "a folder of runs", "a folder of other files" (naming
    a few), or None where it is empty or missing. Dot files and folders are not counted."""
    path = Path(path)
    if not path.is_dir():
        return None
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if (path / RUN_FILE).exists() or (path / CONFIG_FILE).exists():
        return "a run folder"
    if (path / SWEEP_RECORD).exists():
        return "a sweep folder"
    if any(_holds_dataset(p) for p in [path, *entries] if p.is_dir()):
        return "a dataset folder"
    if entries and all(p.is_dir() and folder_kind(p) == "a run folder" for p in entries):
        return "a folder of runs"
    if entries:
        return f"a folder of other files ({', '.join(p.name for p in entries[:3])}{', ...' if len(entries) > 3 else ''})"
    return None


def _holds_dataset(folder: Path) -> bool:
    from ..data import datasets

    names = {fn for spec in datasets.DATASETS.values() for fn, _ in spec.files.values()}
    return any(p.name.removesuffix(".gz") in names for p in folder.iterdir())


def create_run_dir(runs_dir: Path, name: str | None, stem: str) -> Path:
    """mkdir a new run folder: `name` if given (refused if taken), else `<stem>-<time>-<random>`.
    A --runs-dir that is itself a run, a sweep's or a dataset's folder is refused: runs go into
    a folder of runs."""
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise RunError(f"{runs_dir}: --runs-dir must be a folder, but this is a file")
    kind = folder_kind(runs_dir)
    if kind in ("a run folder", "a sweep folder", "a dataset folder"):
        hint = f"scoretrain sweep ... --runs-dir {runs_dir}" if kind == "a sweep folder" else "a folder of runs, e.g. runs/"
        raise RunError(f"{runs_dir}: --runs-dir is {kind}, not a folder of runs: give {hint}")
    if name is not None:
        check_name(name)
    _made[str(runs_dir)] = missing_parents(runs_dir)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{runs_dir}: cannot create the runs folder ({e.strerror or e}); choose another --runs-dir") from None
    names = [name] if name is not None else (f"{stem}-{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}" for _ in range(100))
    for candidate in names:
        path = runs_dir / candidate
        try:
            path.mkdir()
            return path
        except FileExistsError:
            if name is not None:
                raise RunError(f"{path}: a run with this name already exists (choose another --name, or --resume it)") from None
        except OSError as e:  # read-only, no permission, full, a name too long for this file system
            raise RunError(f"{path}: cannot create the run folder ({e.strerror or e}); choose another --runs-dir") from None
    raise RunError(f"{runs_dir}: could not find a free run name")


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise RunError(f"--name {name!r}: use letters, digits and . _ = + - (no slashes, spaces or newlines)")
    if len(name.encode()) > NAME_MAX:
        raise RunError(f"--name: {len(name.encode())} characters is too long for a folder name (at most {NAME_MAX})")


_made: dict[str, list[Path]] = {}  # runs folder -> the folders create_run_dir made for it, deepest first


def missing_parents(path: Path) -> list[Path]:
    """The folders that a mkdir(parents=True) of `path` would create, deepest first."""
    path, out = Path(path), []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def remove_folders(folders: list[Path]) -> None:
    """rmdir each folder (deepest first) this process made, where it is still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something else is in it, or the file system refuses: leave it
            return


def remove_unstarted(run_dir: Path) -> None:
    """Delete a run folder that this process created but could not write its first checkpoint
    into: nothing of the run exists yet, and a folder holding only config.yaml would look like a
    run killed before its first checkpoint. Only the files `fit` writes are removed, and the
    folders above it that create_run_dir made."""
    for name in (CONFIG_FILE, RUN_FILE):  # (write_atomic removes its own temporary files)
        (Path(run_dir) / name).unlink(missing_ok=True)
    remove_folders([Path(run_dir), *_made.pop(str(Path(run_dir).parent), [])])


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_config(run_dir: Path, text: str) -> None:
    write_atomic(run_dir / CONFIG_FILE, lambda p: p.write_text(text))


def base_attrs(seed: int, backend: str, device: str, mean: float, std: float, spec: str) -> dict:
    """A new run's root attributes; `spec` is the resolved spec as YAML (config.dump)."""
    return {
        "spec": spec,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": "running",
        "created": now(),
        "updated": now(),
        "scoretrain_version": __version__,
        "backend": backend,
        "device": device,
        "seed": seed,
        "input_mean": mean,
        "input_std": std,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def environments(run: Run) -> list[dict]:
    """What each session that trained the run ran on (environment.describe), oldest first, each
    with `from_epoch`, the first epoch it trained; [] for a run of an older scoretrain."""
    return json.loads(run.attrs.get("environments", "[]"))


def record_environment(run: Run, env: dict) -> None:
    """Add this process's record (from the run's next epoch on)."""
    run.attrs["environments"] = json.dumps(environments(run) + [{"from_epoch": run.epochs_done + 1, **env}])


# --- run.h5 -----------------------------------------------------------------------------------


def save(run_dir: Path, run: Run) -> None:
    run.attrs["updated"] = now()
    write_atomic(Path(run_dir) / RUN_FILE, lambda p: _write_h5(p, run))
    run.epochs_saved = run.epochs_done


# HDF5 crashes (a segfault, not an error) where its own allocations fail: under an address-space
# limit (ulimit -v) that training has nearly used up, say. Before it runs, this much must be free,
# or the write fails as Python's allocations do, with a MemoryError.
HDF5_HEADROOM = 32 << 20


def _write_h5(path: Path, run: Run) -> None:
    try:
        np.empty(HDF5_HEADROOM, np.uint8)  # address space only: nothing is touched
    except MemoryError:
        raise MemoryError(f"less than {HDF5_HEADROOM >> 20} MiB of memory left to write {path.name}") from None
    # rdcc_nbytes=0: no chunk cache, so each chunk is written (and a full disk raised) where it is made,
    # not flushed when h5py drops its dataset objects (where HDF5 could only print the error)
    with h5py.File(path, "w", rdcc_nbytes=0) as f:
        for key, value in run.attrs.items():
            f.attrs[key] = value
        f.attrs["epochs_done"] = run.epochs_done
        for i, w in enumerate(run.weights):
            g = f.create_group(f"layers/{i:02d}")
            g.attrs["kind"] = "conv" if w.ndim == 4 else "linear"
            _array(g, "weight", w.astype(np.float32))
            if run.scores is not None:
                g.attrs["k"] = run.k
                _array(g, "scores", run.scores[i].astype(np.float32))
                if run.masks is not None:
                    _array(g, "mask", run.masks[i].astype(np.uint8))
                if run.mask_change_layers:
                    _array(g, "mask_change", np.array([row[i] for row in run.mask_change_layers]))
        for i, s in enumerate(run.norms or []):
            _array(f, f"batchnorm/{i:02d}/state", np.asarray(s, np.float32))
        m = f.create_group("metrics")
        for key in METRICS:
            dtype = np.int32 if key == "epoch" else np.float64
            _array(m, key, np.asarray(run.metrics[key], dtype=dtype), maxshape=(None,))
        if run.optimizer is not None:
            o = f.create_group("optimizer")
            o.attrs["name"] = run.optimizer["name"]
            o.attrs["steps"] = run.optimizer["steps"]
            for slot, arrays in run.optimizer["slots"].items():
                for i, a in enumerate(arrays):
                    _array(o, f"{slot}/{i:02d}", a)


def _array(group, name: str, data: np.ndarray, **kw) -> None:
    """A dataset with HDF5's Fletcher-32 checksum of each chunk, which HDF5 verifies on every read:
    bit rot in run.h5 is a read error (see _read), never a quietly different network."""
    if data.ndim == 0:  # a scalar cannot be chunked, and so has no checksum
        group.create_dataset(name, data=data, **kw)
        return
    chunks = None if data.size else (1,) * data.ndim  # an empty array gets a chunk shape of its own
    group.create_dataset(name, data=data, fletcher32=True, chunks=chunks, **kw)


def _read(dataset) -> np.ndarray:
    """A dataset's values; a RunError naming it where HDF5 finds its checksum wrong (or cannot read it)."""
    try:
        return dataset[()]
    except OSError as e:
        # the Fletcher-32 filter is the only one run.h5 uses: its failure is a checksum that does not match
        reason = "its checksum does not match: the file is damaged" if dataset.fletcher32 else str(e).splitlines()[0]
        raise RunError(f"{dataset.file.filename}: cannot read the array {dataset.name} ({reason}); restore the run from a copy") from None


def load(run_dir: Path, with_optimizer: bool = False) -> Run:
    """Read a run directory's run.h5, with a one-line RunError for anything that is not a
    readable run of a format this version knows."""
    return _read_run_file(run_dir, lambda f, path: _read_h5(f, path, with_optimizer))


def _read_run_file(run_dir: Path, read):
    """Check that `run_dir` is a run directory with a run.h5, open that read-only (without
    HDF5 file locking, so a run being trained can be read) and return `read(f, path)`. Every
    way it can fail is a one-line RunError; an h5py error means a corrupt or truncated file."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: not a run directory (a file)" if run_dir.exists() else f"{run_dir}: no such run directory")
    if not path.is_file():
        if never_checkpointed(run_dir):
            raise RunError(f"{run_dir}: the run stopped before its first checkpoint (no {RUN_FILE}); "
                           f"start it over with: scoretrain fit --resume {run_dir}")
        raise RunError(f"{run_dir}: not a scoretrain run (no {RUN_FILE})")
    try:
        with h5py.File(path, "r", locking=False) as f:
            return read(f, path)
    except RunError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise RunError(f"{path}: corrupt or truncated run file ({str(e).splitlines()[0]})") from None


def _read_attrs(f: h5py.File, path: Path) -> dict:
    """run.h5's root attributes as plain Python values, refusing a file that is not a
    scoretrain run or is of a newer format_version than this version reads."""
    attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise RunError(f"{path}: not a scoretrain run file (format attribute {attrs.get('format')!r})")
    version = int(attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise RunError(f"{path}: format_version {version} is newer than this scoretrain ({__version__}) reads ({FORMAT_VERSION}); upgrade scoretrain")
    return attrs


def _read_h5(f: h5py.File, path: Path, with_optimizer: bool) -> Run:
    attrs = _read_attrs(f, path)
    layers = [f["layers"][name] for name in sorted(f["layers"])]
    weights = [_read(g["weight"]) for g in layers]
    has_scores = all("scores" in g for g in layers)
    run = Run(
        attrs=attrs,
        weights=weights,
        scores=[_read(g["scores"]) for g in layers] if has_scores else None,
        masks=[_read(g["mask"]).astype(bool) for g in layers] if has_scores and all("mask" in g for g in layers) else None,
        k=float(layers[0].attrs["k"]) if has_scores else 1.0,
        metrics=_read_metrics(f, path),
        mask_change_layers=np.stack([_read(g["mask_change"]) for g in layers], axis=1).tolist()
        if layers and all("mask_change" in g for g in layers) else [],
    )
    if "batchnorm" in f:
        run.norms = [_read(f["batchnorm"][name]["state"]) for name in sorted(f["batchnorm"])]
    run.epochs_saved = run.epochs_done
    if with_optimizer and "optimizer" in f:
        o = f["optimizer"]
        slots = {slot: [_read(o[slot][i]) for i in sorted(o[slot])] for slot in o}
        run.optimizer = {"name": o.attrs["name"], "steps": int(o.attrs["steps"]), "slots": slots}
    return run


def load_spec(run_dir: Path, run: Run) -> config_mod.Config:
    """The resolved spec the run was trained with: the copy in run.h5 (attribute `spec`), which
    config.yaml mirrors for people to read. Runs written before run.h5 carried it read
    config.yaml. A RunError (exit 1) where neither can be read."""
    run_dir = Path(run_dir)
    try:
        if run.attrs.get("spec"):
            return config_mod.from_text(run.attrs["spec"], f"{run_dir / RUN_FILE} (its spec)")
        if not (run_dir / CONFIG_FILE).is_file():
            raise RunError(f"{run_dir}: no {CONFIG_FILE}, and its {RUN_FILE} (written by scoretrain "
                           f"{run.attrs.get('scoretrain_version', '?')}) keeps no copy of the spec: restore {CONFIG_FILE}")
        return config_mod.load_written(run_dir / CONFIG_FILE)
    except ConfigError as e:  # a broken run, not a bad command line: exit 1 like the other run errors
        raise RunError(str(e)) from None


def open_run(run_dir: Path, with_optimizer: bool = False) -> tuple[Run, config_mod.Config]:
    """A run and the spec it was trained with, for the commands that read runs: one-line
    RunErrors for anything unreadable or for a spec that does not describe the arrays."""
    run = load(run_dir, with_optimizer)
    cfg = load_spec(run_dir, run)
    check_matches(run_dir, cfg, run)
    run.edited = edited(run_dir, cfg)
    return run, cfg


def check_matches(run_dir: Path, cfg: config_mod.Config, run: Run) -> None:
    """A RunError unless the spec describes the run's arrays: the layer shapes, whether scores
    are learned, and k. (A run's own spec always does; a config.yaml edited beside an older
    run.h5, which keeps no spec, may not.)"""
    info = data_info(cfg, run.attrs)
    layers = build_layers(np, cfg.model, info.image_shape, info.n_classes)
    shapes = [l.shape for l in weight_layers(layers)]
    found = [tuple(a.shape) for a in run.weights]
    norms = [(4 if n.affine else 2, n.c) for n in norm_layers(layers)]
    problem = None
    if shapes != found:
        problem = f"its layers are {_shapes(shapes)}, run.h5 holds {_shapes(found)}"
    elif (run.scores is None) != (METHODS[cfg.model.method].learns == "weights"):
        problem = f"model.method is {cfg.model.method}, but run.h5 {'holds' if run.scores is not None else 'has no'} scores"
    elif run.scores is not None and [s.shape for s in run.scores] != [score_shape(x, cfg.model.score_granularity) for x in shapes]:
        problem = f"model.score_granularity is {cfg.model.score_granularity}, run.h5's scores are {_shapes([s.shape for s in run.scores])}"
    elif run.scores is not None and run.k != cfg.model.k:
        problem = f"model.k is {cfg.model.k:g}, run.h5's masks keep {run.k:g}"
    elif run.norms is not None and [tuple(s.shape) for s in run.norms] != norms:
        problem = f"model.bn is {cfg.model.bn}: BatchNorm states {_shapes(norms) or 'none'}, run.h5 holds {_shapes([s.shape for s in run.norms])}"
    if problem:
        raise RunError(f"{run_dir}: the spec does not describe run.h5 ({problem}): restore the config.yaml it was trained with")


def _shapes(shapes: list) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes)


def edited(run_dir: Path, cfg: config_mod.Config) -> str | None:
    """Where config.yaml no longer says what run.h5 records (someone edited it), as
    'model.k is 0.2, the run's is 0.5'; None where they agree, or there is no config.yaml."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        on_disk = config_mod.load_written(path)
    except ConfigError as e:
        return f"it cannot be read ({e})"
    changed = config_mod.differences(on_disk, cfg)
    if not changed:
        return None
    said = [f"{key} is {new!r}, the run's is {old!r}" for key, new, old in changed[:3]]
    return "; ".join(said) + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else "")


def best_by_validation(metrics: dict) -> int | None:
    """The index of the epoch with the best validation accuracy (the first on ties), None where the
    run has no validation split: the epoch a run is selected at, without looking at the test split."""
    val = metrics.get("val_acc", [])
    scored = [i for i, v in enumerate(val) if not math.isnan(v)]
    return max(scored, key=val.__getitem__) if scored else None

def live_status(run: Run) -> str:
    """The recorded status, except that a "running" run whose process is gone (killed with
    SIGKILL, or its machine rebooted) is reported as "interrupted"."""
    status = run.attrs.get("status", "unknown")
    if status == "running" and run.attrs.get("host") == socket.gethostname():
        try:
            os.kill(int(run.attrs.get("pid", 0)), 0)
        except ProcessLookupError:
            return "interrupted"
        except (PermissionError, ValueError, OverflowError):
            pass
    return status


def load_summary(run_dir: Path) -> Run:
    """Read only run.h5's root attributes and /metrics: no weights, scores, masks or optimizer
    state, so it stays fast on wide nets (`scoretrain compare`). The Run it returns has no
    weights. Refuses what `load` refuses, with the same one-line RunErrors."""
    return _read_run_file(run_dir, _read_summary)


def _read_summary(f: h5py.File, path: Path) -> Run:
    return Run(attrs=_read_attrs(f, path), weights=[], metrics=_read_metrics(f, path))


def _read_metrics(f: h5py.File, path: Path) -> dict[str, list]:
    """/metrics, refused in one line unless it is one row per epoch: every metric as long as
    `epoch`, which counts 1, 2, ... up to the root attribute epochs_done."""
    m = f["metrics"]
    n = len(m["epoch"])
    metrics = {key: _read(m[key]).tolist() if key in m or key not in OPTIONAL_METRICS else [float("nan")] * n for key in METRICS}
    problem = next((f"{key} has {len(v)} values for {n} epochs" for key, v in metrics.items() if len(v) != n), None)
    if problem is None and metrics["epoch"] != list(range(1, n + 1)):
        problem = f"epoch counts {metrics['epoch'][:5]}{' ...' if n > 5 else ''}, not 1 to {n}"
    if problem is None and int(f.attrs.get("epochs_done", n)) != n:
        problem = f"epochs_done is {f.attrs['epochs_done']}, but it has {n} rows"
    if problem:
        raise RunError(f"{path}: inconsistent metrics ({problem}): the file is damaged or was edited; restore the run from a copy")
    return metrics


# --- resuming ---------------------------------------------------------------------------------


def never_checkpointed(run_dir: Path) -> bool:
    """A run folder with its config.yaml but no run.h5: `fit` was killed between creating the
    folder and writing the first checkpoint. `fit --resume` starts it over."""
    run_dir = Path(run_dir)
    return (run_dir / CONFIG_FILE).is_file() and not (run_dir / RUN_FILE).exists()


_claims: dict[str, int] = {}  # run folders this process trains: real path -> the locked fd


def claim(run_dir: Path) -> bool:
    """Lock the run folder for this process: an exclusive flock on the folder itself, which the
    kernel drops when the process ends however it ends (SIGKILL included), so there is nothing
    stale to clean up. A second `fit --resume` of the same run is refused while one trains it.
    Returns whether a lock is held: best effort where the file system has no flock; a missing
    folder is left to load() to report."""
    key = os.path.realpath(run_dir)
    if key in _claims:
        return True
    if fcntl is None:
        return False
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:
        return False
    for attempt in range(20):  # a reader's probe (held()) holds a shared lock for microseconds
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == 19:
                os.close(fd)
                raise RunError(f"{run_dir}: another process is training this run; resume it once it has stopped") from None
            time.sleep(0.01)
        except OSError:  # no flock here (some network file systems): go on unlocked
            os.close(fd)
            return False
    _claims[key] = fd
    return True


def held(run_dir: Path) -> bool:
    """Whether another process holds the run folder's lock: trains the run now."""
    key = os.path.realpath(run_dir)
    if key in _claims or fcntl is None:
        return False
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (closing drops the shared lock)


def release(run_dir: Path) -> None:
    fd = _claims.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)


def remove_stale_temps(run_dir: Path) -> None:
    """Delete the temporary files (`.run.h5.<pid>.tmp`, `.config.yaml.<pid>.tmp`) that a writer
    killed in mid-checkpoint left behind, unless their process is still alive."""
    for tmp in Path(run_dir).glob(".*.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive: not ours to delete
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (PermissionError, OverflowError):
            continue
