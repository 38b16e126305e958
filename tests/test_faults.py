"""Faults a user can cause or meet, beyond bad input (test_bad_input.py): resource limits, file
system faults (a real full disk, a real read-only file system: tmpfs mounts, made as root),
values that look like numbers, edited run files, a closed stdout, signals during writes.

Every case ends in one line naming the problem and what to do, with the documented exit code
(2 for a spec or command line that cannot work, 1 for an error, 128 + the signal), no
traceback, and a record that tells the truth: no run folder where the run never started, a run
marked `failed` with its reason where one did, the last complete checkpoint where a write
failed, and no temporary file left behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FC, TIMEOUT, args_of, assert_identical, for_arch, merged, start, stopped_run, wait_paused
from scoretrain.run import store
from scoretrain.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, code: int, *fragments: str) -> str:
    """`result` (CliRunner's) failed with `code` and one `error: ` line holding every fragment,
    and no exception escaped (in a real process it would have printed a traceback)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def cli(*args, cwd, **kwargs) -> subprocess.CompletedProcess:
    """The real command line in its own process."""
    return subprocess.run([sys.executable, "-m", "scoretrain", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, **kwargs)


def one_line_proc(proc, code: int, *fragments: str) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(name, size): a real file system of `size` bytes (a tmpfs mount) at tmp_path/name, so
    that a full disk is a real ENOSPC; readonly(path) remounts it read-only (EROFS, for root
    too). Skips where mounting is not allowed (not root)."""
    mounted = []

    def make(name: str, size: str = "1m") -> Path:
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); these cases need root")
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def readonly(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file into `folder` until the disk is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 1):  # the last partial blocks too
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def done_run(sweep):
    """A copy of a completed edge-popup run (784-64-10, k=0.5, 2 epochs): runs/r."""
    return sweep("faults", [["--name", "r"]]) / "r"


# --- 1. allocations that cannot succeed, and file-system errors -----------------------------


@pytest.mark.parametrize("overrides,fragments", [
    (["model.widths=[784,2000000000,10]"], ["the network has 1,588,000,000,000 weights", "use a smaller model.widths"]),
    (["model.arch=conv2", "model.width=100000"], ["weights and needs at least", "use a smaller model.width"]),
    (["model.arch=lenet", "model.width=8", "train.eval_batch_size=10000", "data.test_samples=null"], ["for their activations", "train.eval_batch_size"]),
], ids=["huge mlp", "huge conv width", "huge eval batch"])
def test_a_network_that_cannot_fit_in_memory_is_refused_before_anything_exists(tmp_path, small, overrides, fragments):
    result = invoke("fit", FC, *merged(for_arch(small, overrides), overrides), "--runs-dir", tmp_path / "runs")
    one_line(result, 2, "model: ", "available", *fragments)
    assert entries(tmp_path / "runs") == []


def test_under_a_memory_limit_a_run_is_refused_fails_in_one_line_or_completes(tmp_path, small):
    """Real processes under an address-space limit (ulimit -v), raised step by step: first the
    spec is refused before anything exists (exit 2); just above the refusal (the check counts
    only what certainly coexists) an allocation in training fails: one line, exit 1, the run
    `failed` with its reason and its start state kept; with enough memory it completes."""
    args = ["fit", FC, *merged(small, ["train.epochs=1", "model.widths=[784,25000,10]"]), "--runs-dir", tmp_path / "runs", "-q"]
    outcomes = []
    for limit_mb in range(600, 4000, 200):  # refused up to ~900 MiB, fails in training to ~1500, completes above
        limit = limit_mb << 20
        proc = cli(*args, cwd=tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        if proc.returncode == 0:
            break
        assert "Traceback" not in proc.stderr
        if proc.returncode == 2:
            one_line_proc(proc, 2, "the process's memory limit (ulimit -v) leaves", "use a smaller model.widths")
            assert entries(tmp_path / "runs") == [], "a refused run left a folder"
        else:
            line = one_line_proc(proc, 1, "out of memory")
            run_dir = Path(line.split(": ")[1])
            run = store.load(run_dir)
            assert run.epochs_done == 0
            if "run marked failed, epoch 0 kept" in line:
                assert run.attrs["status"] == "failed" and run.attrs["message"].startswith("out of memory")
            else:  # no memory left to write a checkpoint: run.h5 keeps its start state, and says so
                assert "run.h5 keeps epoch 0" in line and "scoretrain fit --resume" in line
                assert store.live_status(run) == "interrupted"
            shutil.rmtree(run_dir)
        outcomes.append(proc.returncode)
    assert proc.returncode == 0, f"no limit up to {limit_mb} MiB let the run complete: {outcomes}"
    assert outcomes and outcomes[0] == 2 and 1 in outcomes, outcomes  # refused, then failed in training


def test_a_name_too_long_for_the_file_system_is_one_line(tmp_path, small):
    one_line(invoke("fit", FC, *small, "--name", "n" * 300, "--runs-dir", tmp_path / "runs"), 1, "--name: 300 characters is too long")
    assert entries(tmp_path / "runs") == []


def test_a_runs_dir_inside_a_file_is_one_line(tmp_path, small):
    (tmp_path / "notes.txt").write_text("x")
    one_line(invoke("fit", FC, *small, "--runs-dir", tmp_path / "notes.txt" / "runs"), 1, "cannot create the runs folder", "Not a directory")


def test_a_read_only_runs_dir_is_one_line_and_creates_nothing(tmpfs, small):
    runs = tmpfs("ro")
    readonly(runs)
    one_line(invoke("fit", FC, *small, "--runs-dir", runs), 1, "cannot create the run folder (Read-only file system)", "choose another --runs-dir")
    one_line(invoke("fit", FC, *small, "--runs-dir", runs / "sub"), 1, "cannot create the runs folder (Read-only file system)")


def test_a_disk_too_full_for_the_first_checkpoint_leaves_no_run_folder(tmpfs, small):
    runs = tmpfs("full", "64k")  # room for config.yaml, not for run.h5
    line = one_line(invoke("fit", FC, *small, "--runs-dir", runs, "--name", "r"), 1,
                    "cannot write the run's first checkpoint: the disk is full", "nothing was kept")
    assert str(runs / "r") in line
    assert entries(runs) == []


def test_a_disk_that_fills_up_mid_run_keeps_the_last_epoch_and_resumes_exactly(tmpfs, tmp_path, small, reference):
    """Another process fills the disk after epoch 1's checkpoint: epoch 2's cannot be written.
    One line says so and which epoch is kept; run.h5 is that checkpoint, whole (its status
    cannot be written either, so it reads as interrupted once the process is gone); once space
    is freed, --resume ends bit-identical to the uninterrupted run."""
    runs = tmpfs("disk", "8m")
    run_dir = runs / "r"
    proc = start(tmp_path, ["fit", FC, *args_of(small, "sgd"), "--runs-dir", str(runs), "--name", "r"], pause="epoch 1")
    wait_paused(proc, tmp_path, run_dir, 1)
    filler = fill(runs)
    (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=TIMEOUT)
    proc.stderr = err
    one_line_proc(proc, 1, f"{run_dir}: cannot write the checkpoint of epoch 2: the disk is full",
                  "run.h5 keeps epoch 1", f"scoretrain fit --resume {run_dir}")
    assert "epoch 1/4" in out and "epoch 2/4" not in out and "Traceback" not in out
    run = store.load(run_dir, with_optimizer=True)
    assert run.epochs_done == 1 and store.live_status(run) == "interrupted"
    assert entries(run_dir) == ["config.yaml", "run.h5"]  # no temporary file left
    filler.unlink()
    result = invoke("fit", "--resume", run_dir, "-q")
    assert result.exit_code == 0, result.output
    assert_identical(run_dir, reference("sgd"))


def test_a_run_folder_removed_mid_run_is_one_line(tmp_path, small):
    run_dir = tmp_path / "runs" / "r"
    proc = start(tmp_path, ["fit", FC, *args_of(small, "sgd"), "--runs-dir", str(tmp_path / "runs"), "--name", "r"], pause="epoch 1")
    wait_paused(proc, tmp_path, run_dir, 1)
    shutil.rmtree(run_dir)
    (tmp_path / "go").touch()
    _, proc.stderr = proc.communicate(timeout=TIMEOUT)
    one_line_proc(proc, 1, "cannot write the checkpoint of epoch 2: No such file or directory")


@pytest.mark.parametrize("where,fragment", [
    (lambda tmp: tmp, "is a folder; give a file name"),
    (lambda tmp: tmp / "missing" / "b.json", "no such folder"),
], ids=["folder", "missing folder"])
def test_bench_refuses_a_json_path_it_cannot_write_before_it_runs(tmp_path, where, fragment):
    result = invoke("bench", "--quick", "--device", "cpu", "--json", where(tmp_path))
    one_line(result, 2, "--json", fragment)
    assert result.stdout == ""  # refused before the benchmark, not after minutes of it


def test_bench_refuses_a_read_only_folder_before_it_runs(tmpfs):
    folder = tmpfs("ro")
    readonly(folder)
    result = invoke("bench", "--quick", "--device", "cpu", "--json", folder / "b.json")
    one_line(result, 2, "cannot write into")
    assert result.stdout == ""


def test_export_to_a_read_only_or_full_disk_is_one_line_and_leaves_nothing(tmpfs, done_run):
    ro = tmpfs("ro")
    readonly(ro)
    one_line(invoke("export", done_run, "--to", ro / "s.npz"), 1, "s.npz: cannot write (the file system is read-only")
    full = tmpfs("full", "64k")
    fill(full)
    for name in ("s.npz", "s.safetensors"):
        one_line(invoke("export", done_run, "--to", full / name), 1, f"{name}: cannot write (the disk is full")
    assert entries(full) == ["filler"]


def test_data_fetch_into_a_read_only_root_is_one_line(tmpfs):
    root = tmpfs("ro")
    readonly(root)
    one_line(invoke("data", "fetch", "fashion-mnist", "--root", root), 1, "cannot create", "Read-only file system")


# --- 2. values that escape validation ----------------------------------------------------------


@pytest.mark.parametrize("override,fragment", [
    ("train.lr=inf", "train.lr: expected a finite number, got 'inf'"),
    ("train.lr=1e999", "train.lr: expected a finite number, got '1e999'"),
    ("train.lr=-Infinity", "train.lr: expected a finite number"),
    ("train.lr=nan", "train.lr: expected a finite number, got 'nan'"),
    ("train.weight_decay=Infinity", "train.weight_decay: expected a finite number, got 'Infinity'"),
    ("train.momentum=NaN", "train.momentum: expected a finite number"),
    ("model.k=.nan", "model.k: expected a finite number"),
    ("train.betas=[0.9,inf]", "train.betas[1]: expected a finite number, got 'inf'"),
    ("seed=9223372036854775808", "seed: expected an integer that fits in 64 bits"),
    ("train.epochs=100000000000000000000", "train.epochs: expected an integer that fits in 64 bits"),
    ("data.crop_padding=100000", "data.crop_padding: expected an integer in [0, 28] (at most the image size of mnist)"),
    ("model={k: 0.1, k: 0.2}", "override 'model={k: 0.1, k: 0.2}': duplicate key 'k'"),
])
def test_a_value_that_is_not_a_usable_number_is_refused_before_anything_runs(tmp_path, small, override, fragment):
    one_line(invoke("fit", FC, *merged(small, [override]), "--runs-dir", tmp_path / "runs"), 2, fragment)
    assert entries(tmp_path / "runs") == []


@pytest.mark.parametrize("text,fragment", [
    ("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "dup.yaml:4:3: duplicate key 'lr' (first given on line 2)"),
    ("model:\n  k: 0.5\ntrain:\n  lr: 0.1\nmodel:\n  k: 0.3\n", "dup.yaml:5:1: duplicate key 'model' (first given on line 1)"),
], ids=["key", "section"])
def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path, small, text, fragment):
    (tmp_path / "dup.yaml").write_text(text)
    one_line(invoke("fit", tmp_path / "dup.yaml", *small, "--runs-dir", tmp_path / "runs"), 2, fragment)
    assert entries(tmp_path / "runs") == []


@pytest.mark.parametrize("name", ["run\n", "run\nx", " run", "run/..", "-run"])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, small, name):
    one_line(invoke("fit", FC, *small, "--name", name, "--runs-dir", tmp_path / "runs"), 1, "--name", "use letters, digits")
    assert entries(tmp_path / "runs") == []


# --- 4. run.h5 and config.yaml that disagree ---------------------------------------------------


EDITS = {
    "widths": ("widths: [784, 64, 10]", "widths: [784, 300, 10]"),
    "method": ("method: edge-popup", "method: biprop"),
    "k": ("k: 0.5", "k: 0.2"),
}


def edit(run_dir: Path, what: str) -> None:
    old, new = EDITS[what]
    text = (run_dir / "config.yaml").read_text()
    assert old in text
    (run_dir / "config.yaml").write_text(text.replace(old, new))


@pytest.mark.parametrize("what", list(EDITS))
def test_readers_answer_from_run_h5_after_config_yaml_was_edited(done_run, what):
    recorded = store.load(done_run).metrics["test_acc"][-1]
    edit(done_run, what)
    result = invoke("eval", done_run, "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["test_acc"] == recorded and r["matches_record"] and r["masks_match_scores"] and r["method"] == "edge-popup"
    warning = result.stderr.splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: {done_run / 'config.yaml'} was edited (model.")
    report = json.loads(invoke("inspect", done_run, "--json").stdout)
    assert report["widths"] == [784, 64, 10] and report["method"] == "edge-popup" and report["k"] == 0.5
    assert report["kept"] == pytest.approx(0.5, abs=1e-4)
    row = json.loads(invoke("compare", done_run, "--json").stdout)[0]
    assert (row["widths"], row["method"], row["k"]) == ([784, 64, 10], "edge-popup", 0.5) and row["edited"]
    assert invoke("export", done_run, "--to", done_run.parent / "s.npz").exit_code == 0


def test_a_deleted_config_yaml_changes_nothing_for_the_readers(done_run, tmp_path):
    before = json.loads(invoke("eval", done_run, "--json").stdout)
    (done_run / "config.yaml").unlink()
    after = invoke("eval", done_run, "--json")
    assert after.exit_code == 0 and after.stderr == "" and json.loads(after.stdout) == before
    for args in (["inspect", done_run], ["compare", done_run], ["export", done_run, "--to", tmp_path / "s.npz"]):
        result = invoke(*args)
        assert result.exit_code == 0 and result.stderr == "", (args, result.output)


def old_style(run_dir: Path) -> None:
    """As a run written before run.h5 kept a copy of its spec."""
    with h5py.File(run_dir / "run.h5", "r+") as f:
        f.attrs.pop("spec")


@pytest.mark.parametrize("what,fragment", [
    ("widths", "its layers are 300x784, 10x300, run.h5 holds 64x784, 10x64"),
    ("method", None),
    ("k", "model.k is 0.2, run.h5's masks keep 0.5"),
])
def test_an_older_run_whose_config_yaml_was_edited_is_refused_in_one_line(done_run, tmp_path, what, fragment):
    old_style(done_run)
    edit(done_run, what)
    if fragment is None:  # biprop over the same arrays: the shapes, scores and k all fit
        assert invoke("eval", done_run, "--json").exit_code == 0
        return
    for args in (["eval", done_run], ["inspect", done_run], ["export", done_run, "--to", tmp_path / "s.npz"]):
        one_line(invoke(*args), 1, "the spec does not describe run.h5", fragment, "restore the config.yaml")


def test_an_older_run_without_config_yaml_is_the_same_error_for_every_reader(done_run, tmp_path):
    old_style(done_run)
    (done_run / "config.yaml").unlink()
    for args in (["eval", done_run], ["inspect", done_run], ["compare", done_run], ["export", done_run, "--to", tmp_path / "s.npz"]):
        one_line(invoke(*args), 1, "no config.yaml, and its run.h5", "keeps no copy of the spec: restore config.yaml")


@pytest.fixture
def interrupted(tmp_path, small):
    """A run stopped by SIGTERM after epoch 1 of 4: runs/r."""
    return stopped_run(tmp_path, small)


@pytest.mark.parametrize("change,fragment", [
    (("k: 0.5", "k: 0.2"), "model.k is 0.2, but the run was trained with 0.5"),
    (("method: edge-popup", "method: biprop"), "model.method is 'biprop', but the run was trained with 'edge-popup'"),
    (("widths: [784, 64, 10]", "widths: [784, 300, 10]"), "model.widths is [784, 300, 10]"),
    (("seed: 0", "seed: 5"), "seed is 5, but the run was trained with 0"),
    (("train_samples: 2000", "train_samples: 1000"), "data.train_samples is 1000"),
], ids=["k", "method", "widths", "seed", "data"])
def test_resume_refuses_a_changed_seed_data_or_model_and_leaves_the_run(interrupted, change, fragment):
    edit_text = (interrupted / "config.yaml").read_text()
    assert change[0] in edit_text
    (interrupted / "config.yaml").write_text(edit_text.replace(*change))
    before = (interrupted / "run.h5").read_bytes()
    one_line(invoke("fit", "--resume", interrupted), 2, fragment, "cannot change on resume")
    assert (interrupted / "run.h5").read_bytes() == before


def test_resume_takes_more_epochs_from_config_yaml_and_records_them(interrupted):
    text = (interrupted / "config.yaml").read_text()
    (interrupted / "config.yaml").write_text(text.replace("epochs: 4", "epochs: 5"))
    result = invoke("fit", "--resume", interrupted, "-q")
    assert result.exit_code == 0, result.output
    run, cfg = store.open_run(interrupted)
    assert run.epochs_done == 5 and cfg.train.epochs == 5 and run.attrs["status"] == "completed"
    assert invoke("eval", interrupted).stderr == ""  # config.yaml and run.h5 agree again


def test_resume_without_config_yaml_resumes_from_run_h5_and_restores_it(interrupted, reference):
    (interrupted / "config.yaml").unlink()
    assert invoke("fit", "--resume", interrupted, "-q").exit_code == 0
    assert (interrupted / "config.yaml").read_text() == (reference("sgd") / "config.yaml").read_text()
    assert_identical(interrupted, reference("sgd"))


# --- 5. a closed stdout --------------------------------------------------------------------------


def test_fit_piped_into_head_trains_on_to_the_end(tmp_path, small):
    """`scoretrain fit ... | head -2`: the reader goes away after two lines, the run does not."""
    proc = subprocess.Popen([sys.executable, "-m", "scoretrain", "fit", FC, *merged(small, ["train.epochs=3"]), "--runs-dir", "runs", "--name", "r"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=TIMEOUT) == 0, err
    assert lines[0].startswith("fit runs/r: ") and lines[1].startswith("epoch 1/3")
    assert err.splitlines() == ["stdout was closed; the run trained on to the end: runs/r is completed after 3 epochs"]
    run = store.load(tmp_path / "runs" / "r")
    assert run.attrs["status"] == "completed" and run.epochs_done == 3 and "message" not in run.attrs


@pytest.mark.parametrize("args", [
    lambda r: ["fit", FC, *SMALL_ARGS, "--runs-dir", r.parent, "--name", "q", "-q"],
    lambda r: ["compare", r.parent, "--json"],
    lambda r: ["compare", r.parent],
    lambda r: ["inspect", r],
    lambda r: ["eval", r, "--json"],
    lambda r: ["data", "list"],
    lambda r: ["--help"],
], ids=["fit -q", "compare --json", "compare", "inspect", "eval --json", "data list", "help"])
def test_a_closed_stdout_is_no_error(done_run, args):
    r, w = os.pipe()
    os.close(r)  # every write to stdout fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "scoretrain", *map(str, args(done_run))], cwd=done_run.parent,
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    finally:
        os.close(w)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr
    if args(done_run)[0] == "fit":
        assert store.load(done_run.parent / "q").attrs["status"] == "completed"


SMALL_ARGS = ["data.train_samples=2000", "data.test_samples=500", "train.epochs=1", "model.widths=[784,64,10]", "device=cpu"]


# --- 6. signals during writes: nothing left behind ------------------------------------------

# Runs the real CLI with the .npz writer stalled halfway, until a signal arrives.
EXPORT_HOOK = r"""
import os, sys, time
from pathlib import Path
import numpy as np
from scoretrain.cli import main

def stalled(fh, **arrays):
    fh.write(b"PK half an archive")
    fh.flush()
    (Path(os.environ["ST_HOOK"]) / "paused").touch()
    while True:
        time.sleep(0.01)

np.savez_compressed = stalled
sys.argv = ["scoretrain", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_export_leaves_no_temporary_file(done_run, tmp_path, signum):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", EXPORT_HOOK, "export", str(done_run), "--to", str(out / "s.npz")],
                            env=dict(os.environ, ST_HOOK=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "paused").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    assert len(entries(out)) == 1 and entries(out)[0].startswith(".s.npz.")  # the half-written temporary file
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    assert entries(out) == []


def test_sigterm_during_a_download_leaves_no_partial_file(tmp_path, mirror_server):
    mirror_server.files["train-images-idx3-ubyte.gz"] = b"x" * 100_000
    env = dict(os.environ, SCORETRAIN_MIRRORS=mirror_server.url("stall"))
    proc = subprocess.Popen([sys.executable, "-m", "scoretrain", "data", "fetch", "fashion-mnist", "--root", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "fashion-mnist"
    deadline = time.monotonic() + TIMEOUT
    while not (mirror_server.hits and any(p.suffix == ".part" for p in folder.glob(".*"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert entries(folder) == []


# --- the .safetensors export, read without scoretrain ----------------------------------------


def test_the_safetensors_export_carries_the_architecture_and_the_subnetwork(done_run, tmp_path):
    from safetensors import safe_open

    assert invoke("export", done_run, "--to", tmp_path / "s.npz").exit_code == 0
    result = invoke("export", done_run, "--to", tmp_path / "s.safetensors")
    assert result.exit_code == 0, result.output
    npz = np.load(tmp_path / "s.npz")
    with safe_open(str(tmp_path / "s.safetensors"), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "scoretrain-subnetwork" and json.loads(meta["architecture"]) == json.loads(str(npz["architecture"]))
    assert json.loads(meta["image_shape"]) == [28, 28, 1] and meta["n_classes"] == "10"
    assert sorted(tensors) == ["input_mean", "input_std", "weight_00", "weight_01"]
    for key, value in tensors.items():
        assert value.dtype == np.float32 and np.array_equal(value, npz[key])
