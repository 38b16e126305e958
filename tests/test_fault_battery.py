"""A battery of mistakes and faults a user makes or meets, across sweep, compare, eval, inspect,
export, the data a run reads, the settings it is given, and the Python API. Every case holds to
one rule: the documented exit code (or exception), one line on stderr naming the problem (no
traceback), and nothing on disk changed: no file or folder made, changed or removed.

Each case runs the real command line in a process of its own (under an address-space limit, so a
grid that would plan a hundred million runs fails instead of taking the machine), in a workspace
of its own built from a few small runs trained once."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import pytest
from typer.testing import CliRunner

import scoretrain
from scoretrain.cli import app
from scoretrain.errors import ScoretrainError

FC = str(Path(__file__).resolve().parent.parent / "configs" / "mnist_fc.yaml")
TINY = ["data.train_samples=256", "data.test_samples=200", "train.epochs=1", "model.widths=[784,16,10]",
        "train.batch_size=64", "train.eval_batch_size=200", "device=cpu"]
LIMIT = 4 << 30  # bytes of address space for each command


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> Path:
    """Made once: runs/ok (edge-popup), runs/dense, ok.ticket, and sweep/ (lr0.1 completed, lr1e30
    failed: a divergence), each case copying what it needs."""
    root = tmp_path_factory.mktemp("stock")
    runner = CliRunner()
    for name, extra in (("ok", []), ("dense", ["model.method=dense"])):
        result = runner.invoke(app, ["fit", FC, *TINY, *extra, "--runs-dir", str(root / "runs"), "--name", name, "-q"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(root / "runs" / "ok"), "--to", str(root / "ok.ticket")])
    assert result.exit_code == 0, result.output
    out = command(["sweep", FC, "train.lr=0.1,1e30", "model.method=dense", *TINY, "--runs-dir", "sweep"], root)
    assert out.returncode == 1 and (root / "sweep" / "lr1e30").is_dir(), out.stderr
    return root


def command(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scoretrain", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT)))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder below `folder`: its path, and a file's SHA-256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


# --- damage, as a disk or an editor does it -----------------------------------------------------


def rot(run_dir: Path, array: str) -> None:
    """Flip bytes in the middle of an array's stored data in run.h5, as bit rot would."""
    path = run_dir / "run.h5"
    with h5py.File(path, "r") as f:
        ds = f[array]
        if ds.chunks:
            info = ds.id.get_chunk_info(0)
            offset, size = info.byte_offset, info.size
        else:
            offset, size = ds.id.get_offset(), ds.id.get_storage_size()
    with open(path, "r+b") as fh:
        fh.seek(offset + size // 2)
        byte = fh.read(1)
        fh.seek(offset + size // 2)
        fh.write(bytes([byte[0] ^ 0x5A]))


def edit_metric(run_dir: Path, key: str, values) -> None:
    """Rewrite one metric through HDF5 (a valid file whose numbers no longer agree)."""
    with h5py.File(run_dir / "run.h5", "r+") as f:
        del f[f"metrics/{key}"]
        f.create_dataset(f"metrics/{key}", data=values, maxshape=(None,))


# --- the cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    """`args` (the command line, after `scoretrain`) run in a workspace that `setup(ws, stock)`
    builds, or `api(ws)` called in this process; the exit code (an API error's exit_code) and
    fragments of the one stderr line (the error's message) expected."""

    setup: Callable[[Path, Path], None]
    code: int
    fragments: tuple[str, ...]
    args: list[str] = field(default_factory=list)
    api: Callable[[Path], object] | None = None
    env: Callable[[Path], dict] | None = None


def runs(*names):
    def setup(ws, stock):
        for name in names:
            shutil.copytree(stock / "runs" / name, ws / "runs" / name)
    return setup


def nothing(ws, stock):
    pass


def with_sweep(ws, stock):
    shutil.copytree(stock / "sweep", ws / "sweep")


def then(*steps):
    def setup(ws, stock):
        for step in steps:
            step(ws, stock)
    return setup


def rotted(array):
    return then(runs("ok"), lambda ws, stock: rot(ws / "runs" / "ok", array))


def bad_metrics(ws, stock):
    runs("ok")(ws, stock)
    edit_metric(ws / "runs" / "ok", "test_acc", [0.5, 0.6, 0.7])  # three values for one epoch


def empty_metrics(ws, stock):
    runs("ok")(ws, stock)
    edit_metric(ws / "runs" / "ok", "test_acc", [])
    edit_metric(ws / "runs" / "ok", "epoch_seconds", [])


def edited_record(ws, stock):
    runs("ok")(ws, stock)
    with h5py.File(ws / "runs" / "ok" / "run.h5", "r") as f:
        acc = f["metrics/test_acc"][()]
    edit_metric(ws / "runs" / "ok", "test_acc", acc + 0.25)  # a record its network does not give


def file_named(name, text="x"):
    def setup(ws, stock):
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(text)
    return setup


def ticket(ws, stock, cut=0):
    data = (stock / "ok.ticket").read_bytes()
    (ws / "ok.ticket").write_bytes(data[: len(data) - cut] if cut else data)


def nested(ws, stock):
    shutil.copytree(stock / "sweep", ws / "top" / "sweep")
    bad_metrics(ws, stock)
    shutil.move(ws / "runs" / "ok", ws / "top" / "bad")
    (ws / "runs").rmdir()


def fake_slurm(ws, stock):
    """sbatch and squeue that answer as a cluster whose controller is down."""
    bin_dir = ws.parent / f"{ws.name}-bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("sbatch", "squeue"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho '{tool}: error: Unable to contact slurm controller (connect failure)' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)


def slurm_env(ws):
    return dict(os.environ, PATH=f"{ws.parent / (ws.name + '-bin')}{os.pathsep}{os.environ['PATH']}")


SWEEP = ["sweep", FC, *TINY]
LR = ["train.lr=0.1,1e30", "model.method=dense"]  # the stock sweep's grid
CASES = {
    # sweep: grids that differ from what was typed, folders that are not a sweep's, faults
    "sweep: a key given twice": Case(nothing, 2, ("model.k is given twice",), [*SWEEP, "model.k=0.1,0.3", "model.k=0.7,0.9", "--runs-dir", "s"]),
    "sweep: two values of one spec": Case(nothing, 2, ("are the same spec",), [*SWEEP, "train.lr=0.1,1e-1", "--runs-dir", "s"]),
    "sweep: a range of fractions": Case(nothing, 2, ("takes integers", "model.k=0.1,0.3"), [*SWEEP, "model.k=0.1:0.5:0.2", "--runs-dir", "s"]),
    "sweep: a hundred million seeds": Case(nothing, 2, ("100,000,000 values",), [*SWEEP, "seed=0:100000000", "--runs-dir", "s"]),
    "sweep: a grid of 11,000 runs": Case(nothing, 2, ("11,000 runs",), [*SWEEP, "seed=0:100", "train.lr=" + ",".join(f"0.0{i}" for i in range(1, 10)) + ",0.1,0.2",
                                                                        "model.k=" + ",".join(f"0.{i}" for i in range(1, 10)) + ",1", "--runs-dir", "s"]),
    "sweep: --jobs 10^12": Case(nothing, 2, ("--jobs",), [*SWEEP, "model.k=0.1,0.3", "--jobs", "1000000000000", "--runs-dir", "s"]),
    "sweep: Slurm's controller down": Case(fake_slurm, 1, ("Slurm does not answer", "--launcher local"),
                                          [*SWEEP, "model.k=0.1,0.3", "--launcher", "slurm", "--runs-dir", "s"], env=slurm_env),
    "sweep: into a run's folder": Case(runs("ok"), 1, ("is a run folder",), [*SWEEP, "model.k=0.1,0.3", "--runs-dir", "runs/ok"]),
    "sweep: into a folder of runs": Case(runs("ok", "dense"), 1, ("is a folder of runs",), [*SWEEP, "model.k=0.1,0.3", "--runs-dir", "runs"]),
    "sweep: into a folder of other files": Case(file_named("notes/todo.txt"), 1, ("a folder of other files (todo.txt)",),
                                               [*SWEEP, "model.k=0.1,0.3", "--runs-dir", "notes"]),
    "sweep: into a dataset's folder": Case(file_named("mnist/train-images-idx3-ubyte.gz"), 1, ("is a dataset folder",),
                                          [*SWEEP, "model.k=0.1,0.3", "--runs-dir", "mnist"]),
    "sweep: its data missing": Case(nothing, 1, ("dataset mnist: files not found",), [*SWEEP, "model.k=0.1,0.3", "data.root=nodata", "--runs-dir", "s"]),
    "sweep: --dry-run of a grid the folder refuses": Case(with_sweep, 1, ("another grid", "would refuse"), [*SWEEP, "model.k=0.1,0.3", "--runs-dir", "sweep", "--dry-run"]),
    "sweep: again, with a failed run": Case(with_sweep, 1, ("1 failed (lr1e30)", "--retry-failed"), [*SWEEP, *LR, "--runs-dir", "sweep"]),
    "sweep: --status of a run's folder": Case(runs("ok"), 1, ("not a sweep folder",), ["sweep", "--status", "runs/ok"]),
    # compare
    "compare: a run's metrics longer than its epochs": Case(bad_metrics, 1, ("inconsistent metrics", "test_acc has 3 values for 1 epochs"), ["compare", "runs/ok"]),
    "compare: a run's metrics cut short": Case(empty_metrics, 1, ("inconsistent metrics",), ["compare", "runs/ok"]),
    "compare: --group-by pooling other methods": Case(runs("ok", "dense"), 0, ("warning:", "differ in model.method", "--group-by model.k,model.method"),
                                                     ["compare", "runs", "--group-by", "model.k"]),
    "compare: a damaged run beside a sweep folder": Case(nested, 0, ("unreadable:", "bad", "inconsistent metrics"), ["compare", "top"]),
    "compare: a damaged run's weights are not read": Case(rotted("layers/00/weight"), 0, (), ["compare", "runs/ok"]),
    "compare: an unknown --sort": Case(runs("ok"), 2, ("--sort",), ["compare", "runs", "--sort", "size"]),
    # eval
    "eval: bit rot in the weights": Case(rotted("layers/00/weight"), 1, ("/layers/00/weight", "checksum"), ["eval", "runs/ok"]),
    "eval: bit rot in the scores": Case(rotted("layers/01/scores"), 1, ("/layers/01/scores", "checksum"), ["eval", "runs/ok"]),
    "eval: a record its network does not reproduce": Case(edited_record, 1, ("differs from the recorded",), ["eval", "runs/ok", "--json"]),
    "eval: bit rot in the metrics": Case(rotted("metrics/train_loss"), 1, ("/metrics/train_loss", "checksum"), ["eval", "runs/ok"]),
    "eval: an unknown --device": Case(runs("ok"), 2, ("device",), ["eval", "runs/ok", "--device", "tpu"]),
    # inspect
    "inspect: bit rot in a mask": Case(rotted("layers/00/mask"), 1, ("/layers/00/mask", "checksum"), ["inspect", "runs/ok"]),
    "inspect: a ticket cut short": Case(lambda ws, stock: ticket(ws, stock, cut=7), 1, ("not a readable scoretrain ticket",), ["inspect", "ok.ticket"]),
    "inspect: a sweep folder": Case(with_sweep, 1, ("sweep",), ["inspect", "sweep"]),
    # export
    "export: bit rot in the weights": Case(rotted("layers/01/weight"), 1, ("/layers/01/weight", "checksum"), ["export", "runs/ok", "--to", "out/ok.npz"]),
    "export: a run with inconsistent metrics": Case(bad_metrics, 1, ("inconsistent metrics",), ["export", "runs/ok", "--to", "ok.npz"]),
    "export: --to below a file": Case(runs("ok"), 1, ("not a folder",), ["export", "runs/ok", "--to", "runs/ok/run.h5/ok.npz"]),
    "export: no ticket for a dense run, into a new folder": Case(runs("dense"), 1, ("no ticket",), ["export", "runs/dense", "--to", "new/deep/d.ticket"]),
    # the data a run reads, and settings that cannot work (before anything is made)
    "fit: its data missing": Case(nothing, 1, ("files not found",), ["fit", FC, *TINY, "data.root=nodata", "--runs-dir", "runs"]),
    "fit: BatchNorm recalibrated on more images than it trains on": Case(nothing, 2, ("train.bn_recalibration", "256"),
                                                                        ["fit", FC, *TINY[:3], "device=cpu", "model.arch=lenet", "model.width=0.125",
                                                                         "model.bn=nonaffine", "train.bn_recalibration=1000", "--runs-dir", "runs"]),
    "fit: one score per class of the last layer": Case(nothing, 2, ("model.score_granularity", "whole classes"),
                                                      ["fit", FC, *TINY, "model.score_granularity=filter", "--runs-dir", "runs"]),
    "fit: a one-layer net kept dense": Case(nothing, 2, ("no scores to learn",), ["fit", FC, *TINY[:3], "device=cpu", "model.widths=[784,10]",
                                                                                 "model.dense_last=true", "--runs-dir", "runs"]),
    "fit: --runs-dir a run's folder": Case(runs("ok"), 1, ("is a run folder",), ["fit", FC, *TINY, "--runs-dir", "runs/ok"]),
    "fit: --runs-dir a sweep's folder": Case(with_sweep, 1, ("is a sweep folder",), ["fit", FC, *TINY, "--runs-dir", "sweep"]),
    # the Python API: the same errors, raised
    "api: fit with one score per class": Case(nothing, 2, ("whole classes",), api=lambda ws: scoretrain.fit(
        FC, [*TINY, "model.score_granularity=filter"], runs_dir=ws / "runs")),
    "api: fit into a dataset's folder": Case(file_named("mnist/t10k-labels-idx1-ubyte.gz"), 1, ("is a dataset folder",),
                                            api=lambda ws: scoretrain.fit(FC, TINY, runs_dir=ws / "mnist")),
    "api: open_run of rotted weights": Case(rotted("layers/00/weight"), 1, ("/layers/00/weight",), api=lambda ws: scoretrain.open_run(ws / "runs" / "ok")),
    "api: measure a run with inconsistent metrics": Case(bad_metrics, 1, ("inconsistent metrics",), api=lambda ws: scoretrain.measure(ws / "runs" / "ok")),
    "api: open_ticket of a ticket cut short": Case(lambda ws, stock: ticket(ws, stock, cut=7), 1, ("ticket",),
                                                  api=lambda ws: scoretrain.open_ticket(ws / "ok.ticket")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, stock, tmp_path):
    case = CASES[name]
    ws = tmp_path / "ws"
    ws.mkdir()
    case.setup(ws, stock)
    before = snapshot(ws)
    if case.api is not None:
        with pytest.raises(ScoretrainError) as err:
            case.api(ws)
        code, lines = err.value.exit_code, str(err.value).splitlines()
    else:
        out = command(case.args, ws, case.env(ws) if case.env else None)
        assert "Traceback" not in out.stderr, out.stderr
        code, lines = out.returncode, out.stderr.splitlines()
        if not case.fragments:  # a command that reads nothing damaged: done, and quiet
            assert code == case.code and lines == [], out.stderr
    if case.fragments:
        assert code == case.code and len(lines) == 1, "\n".join(lines)
        for fragment in case.fragments:
            assert fragment in lines[0], lines[0]
    assert snapshot(ws) == before, "the command changed the workspace"
