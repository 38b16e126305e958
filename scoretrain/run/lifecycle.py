"""A run's lifecycle, one path for the command line, the Python API and the sweep worker:

    start(cfg, runs_dir, name)   a new run folder, claimed, with its config.yaml and first checkpoint
    begin_in(cfg, run_dir)       the same in a folder already claimed (a sweep's run)
    resume(run_dir)              an interrupted run, claimed, from its last finished epoch
    train(session, reporter)     train a claimed run to its end, then release it

Everything that can fail (the spec, the data, the memory budget, the device) is checked before
a run folder is created or changed, so a run that never started leaves nothing behind.

A completed run is not resumed: its learning-rate schedule and k warm-up are laid out over the
epochs it was started with, so more epochs would be another experiment under the same name. An
interrupted run may be resumed with other train keys in its config.yaml (more epochs, say): the
epochs still to come follow the new schedule, and run.h5 records the spec they were trained with.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, RunError, os_reason
from ..kernels import conv_engine
from ..kernels.backend import Backend, load_kernels, resolve
from . import config as config_mod
from . import environment, store, tensorboard
from . import train as loop
from .config import Config
from .resources import DeviceData, check_memory, initial_tensors, load_data


@dataclass
class Session:
    """A claimed run, ready to train: this process holds its lock until `train` releases it."""

    cfg: Config
    run_dir: Path
    backend: Backend
    dd: DeviceData
    run: store.Run
    note: str | None = None  # a line for the user before training (resuming on other libraries)


def new_run(cfg: Config, backend: Backend, dd: DeviceData) -> store.Run:
    """A fresh run: the seed's weights (and scores), no epochs yet."""
    weights, scores = initial_tensors(cfg, dd.info)
    attrs = store.base_attrs(cfg.seed, backend.name, backend.device, dd.mean, dd.std, config_mod.dump(cfg))
    attrs.update(dd.info.to_attrs(), data_source=dd.identity, data_digest=dd.digest)  # what it trains on
    run = store.Run(attrs=attrs, weights=weights, scores=scores, k=cfg.model.k)
    store.record_environment(run, environment.describe(backend, engine(cfg, backend)))
    return run


def on_device(cfg: Config, mean=None, std=None) -> tuple[Backend, DeviceData]:
    """The run's device and its data there, once everything that can refuse the spec has: the
    TensorBoard writer, the device, the data, the memory budget, the kernels. `mean`/`std`: a
    resumed run's recorded standardization."""
    if cfg.train.tensorboard:
        tensorboard.writer_class()  # missing: one line now, not a failed run
    backend = resolve(cfg.device)
    dd = load_data(cfg, backend, mean, std)
    check_memory(cfg, backend, dd)
    load_kernels(backend.xp)
    engine(cfg, backend)  # train.conv_engine=torch without PyTorch: one line now, not a failed run
    return backend, dd


def engine(cfg: Config, backend: Backend):
    """The conv engine the run computes with (train.conv_engine; kernels/conv_engine.py): none
    but im2col's code runs for a network without convs, so it records im2col."""
    layers = cfg.model.layers  # written out once the data's shape is known (config.check_data)
    if layers is not None and not any(isinstance(l, dict) and next(iter(l)) in ("conv", "residual") for l in layers):
        return conv_engine.IM2COL  # (and PyTorch is not even imported)
    return conv_engine.resolve(cfg.train.conv_engine, backend.xp)


def prepare(cfg: Config) -> tuple[Backend, DeviceData, store.Run]:
    """(backend, data, run) for a run from its start, before any folder exists."""
    backend, dd = on_device(cfg)
    return backend, dd, new_run(cfg, backend, dd)


def start(cfg: Config, runs_dir: Path, name: str | None) -> Session:
    """A new run folder under runs_dir (named `name`, or a generated unique name), claimed for
    this process, with its config.yaml and first checkpoint. On failure nothing is kept."""
    if name is not None:
        store.check_name(name)
    backend, dd, run = prepare(cfg)
    stem = cfg.model.method + (f"-k{cfg.model.k:g}" if cfg.model.method == "edge-popup" else "")
    run_dir = store.create_run_dir(Path(runs_dir), name, stem)
    store.claim(run_dir)  # a --resume of it is refused while this process trains it
    _first_checkpoint(cfg, run_dir, run)
    return Session(cfg, run_dir, backend, dd, run, dd.note)


def begin_in(cfg: Config, run_dir: Path) -> Session:
    """A new run in `run_dir`, an empty folder this process has claimed (a sweep's run)."""
    backend, dd, run = prepare(cfg)
    _first_checkpoint(cfg, run_dir, run)
    return Session(cfg, Path(run_dir), backend, dd, run, dd.note)


def _first_checkpoint(cfg: Config, run_dir: Path, run: store.Run) -> None:
    """Write a claimed, empty run folder's config.yaml and first checkpoint; on failure nothing
    is kept (the folder is removed again) and the claim is released."""
    try:
        store.write_config(run_dir, config_mod.dump(cfg))
        store.save(run_dir, run)
    except BaseException as e:
        store.remove_unstarted(run_dir)
        store.release(run_dir)
        if isinstance(e, OSError):
            raise RunError(f"{run_dir}: cannot write the run's first checkpoint: {os_reason(e)}; "
                           "nothing was kept (free some space, or choose another --runs-dir)") from None
        raise


def resume(run_dir: Path) -> Session:
    """Claim an interrupted run and reopen it from its last finished epoch (see reopen)."""
    run_dir = Path(run_dir)
    locked = store.claim(run_dir)  # before reading the status: two resumes of one run cannot both pass the check
    try:
        return reopen(run_dir, locked)
    except BaseException:
        store.release(run_dir)
        raise


def check_resumable(run: store.Run, run_dir, locked: bool = False) -> None:
    """Refuse a completed run, and one still training. `locked`: this process holds the run's
    lock (store.claim), so a "running" record is a writer that died (on another host, say)."""
    status = store.live_status(run)
    if status == "completed":
        n = run.epochs_done
        raise RunError(f"{run_dir}: the run is already completed ({n} epoch{'' if n == 1 else 's'}); nothing to resume "
                       f"(its learning-rate schedule and k warm-up were laid out over {n} epochs: for more, start a new run "
                       "with a larger train.epochs)")
    if status == "running" and not locked:
        raise RunError(f"{run_dir}: the run is still training (pid {run.attrs.get('pid')}); resume it once it has stopped")


def reopen(run_dir: Path, locked: bool = False) -> Session:
    """A claimed run, ready to go on from its last finished epoch. The spec is the one run.h5
    records; config.yaml may change the train keys and the device (e.g. more epochs), but not
    the seed, data or model, which would silently make another experiment of the same run."""
    store.remove_stale_temps(run_dir)  # left by a writer killed in mid-checkpoint
    note = None
    if store.never_checkpointed(run_dir):  # killed before its first checkpoint: start it over
        cfg = config_mod.load_written(run_dir / store.CONFIG_FILE)
        backend, dd, run = prepare(cfg)
    else:
        run, recorded = store.open_run(run_dir, with_optimizer=True)
        cfg = recorded
        if (run_dir / store.CONFIG_FILE).is_file():
            cfg = config_mod.load_written(run_dir / store.CONFIG_FILE)
            changed = config_mod.differences(cfg, recorded, sections=("seed", "data", "model"))
            if changed:
                key, new, old = changed[0]
                raise ConfigError(f"{run_dir / store.CONFIG_FILE}: {key} is {new!r}, but the run was trained with {old!r} "
                                  "(as run.h5 records): the seed, data and model cannot change on resume; restore it, or start a new run")
        check_resumable(run, run_dir, locked)
        backend, dd = on_device(cfg, run.attrs["input_mean"], run.attrs["input_std"])
        check_same_data(run, dd, run_dir)
        run.attrs.update(status="running", pid=os.getpid(), host=socket.gethostname(), message="", spec=config_mod.dump(cfg))
        env, before = environment.describe(backend, engine(cfg, backend)), store.environments(run)
        changed = environment.differences(before[-1], env) if before else []
        if changed:  # the same code and seed can give other bits on other libraries
            note = (f"note: {run_dir} resumes on other libraries than it trained on ({'; '.join(changed)}): "
                    f"epochs {run.epochs_done + 1}.. may differ in their bits from an uninterrupted run")
        store.record_environment(run, env)
    try:
        if not (run_dir / store.CONFIG_FILE).is_file():
            store.write_config(run_dir, config_mod.dump(cfg))
        store.save(run_dir, run)
    except OSError as e:
        raise RunError(f"{run_dir}: cannot write run.h5: {os_reason(e)}; the run is as it was (epoch {run.epochs_saved or 0})") from None
    return Session(cfg, run_dir, backend, dd, run, note)


def check_same_data(run: store.Run, dd: DeviceData, run_dir: Path) -> None:
    """A RunError unless the data is the data the run trained on (the digest run.h5 records;
    runs that record none trained on a verified built-in dataset)."""
    recorded = run.attrs.get("data_digest")
    if recorded and recorded != dd.digest:
        raise RunError(f"{run_dir}: the data ({dd.identity}) is not what the run trained on (its digest {dd.digest[:12]}… differs "
                       f"from the recorded {str(recorded)[:12]}…, from {run.attrs.get('data_source')}); restore that data")


def train(session: Session, reporter) -> store.Run:
    """Train a claimed run to cfg.train.epochs, a checkpoint after each epoch, then release it.
    A stop (train.Interrupted, train.Diverged, train.CheckpointError, a fault) is re-raised after
    run.h5 has recorded it."""
    s = session
    try:
        with conv_engine.using(engine(s.cfg, s.backend)):
            return loop.fit(s.cfg, s.run_dir, s.backend, s.run, s.dd, reporter)
    finally:
        reporter.close()
        store.release(s.run_dir)
