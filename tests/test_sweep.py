"""`scoretrain sweep`: the grid, the run store as the ledger (skip, resume, start), workers that
never train a run twice, the local pool, a real Slurm cluster, and `compare --group-by`."""

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scoretrain.run import store
from scoretrain.commands import sweep as sweep_mod

from conftest import EPOCHS, SMALL, TIMEOUT, assert_identical
from support.slurm_cluster import Cluster, missing

FC = "configs/mnist_fc.yaml"
REPO = Path(__file__).resolve().parents[1]
GRID = ["model.k=0.1,0.5", "seed=0:2"]
NAMES = ["k0.1-seed0", "k0.1-seed1", "k0.5-seed0", "k0.5-seed1"]
BASE = [*(o for o in SMALL if not o.startswith("train.epochs=")), f"train.epochs={EPOCHS}"]  # EPOCHS: conftest.assert_identical's (a sweep takes each key once)
THREADS = max(1, sweep_mod.cores() // 2)  # each worker's BLAS threads in a pool of 2: the bits depend on them
POOL_ENV = sweep_mod.worker_env(THREADS)

# In every Python process of a sweep (PYTHONPATH): the worker of run $ST_PAUSE_RUN pauses after
# the checkpoint of epoch 1, once, until $ST_HOOK/go exists.
SITECUSTOMIZE = r"""
import os, sys, time
from pathlib import Path
if "sweep-worker" in sys.argv and os.environ.get("ST_PAUSE_RUN") in sys.argv:
    hook = Path(os.environ["ST_HOOK"])
    from scoretrain.run import progress
    end = progress.Reporter.epoch_end
    def epoch_end(self, row, *a, **k):
        end(self, row, *a, **k)
        if row["epoch"] == 1 and not (hook / "paused").exists():
            (hook / "paused").touch()
            while not (hook / "go").exists():
                time.sleep(0.01)
    progress.Reporter.epoch_end = epoch_end
"""


def scoretrain(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "scoretrain", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def digests(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.parent.name in NAMES}


def hooked_env(tmp_path: Path, pause_run: str) -> dict:
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(REPO)]), ST_HOOK=str(tmp_path),
                ST_PAUSE_RUN=pause_run)


def wait_for(cond, what: str, proc=None):
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before {what}:\n{out}{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The sweep trained once, uninterrupted, by the local pool: the reference for the others."""
    folder = tmp_path_factory.mktemp("reference") / "sweep"
    out = scoretrain("sweep", FC, *GRID, *BASE, "--jobs", "2", "--runs-dir", str(folder))
    assert out.returncode == 0, out.stdout + out.stderr
    return folder


# --- the grid -----------------------------------------------------------------------------------


def test_grid_values_ranges_and_names():
    grid = sweep_mod.parse({}, ["model.k=0.1,0.5", "seed=0:3", "model.widths=[784,64,10]", "train.lr=0.1"])
    assert grid.axes == {"model.k": [0.1, 0.5], "seed": [0, 1, 2]}
    assert grid.fixed == ["model.widths=[784,64,10]", "train.lr=0.1"]
    runs = sweep_mod.run_names(grid)
    assert list(runs) == [f"k{k}-seed{s}" for k in (0.1, 0.5) for s in range(3)]
    assert runs["k0.5-seed2"] == ["model.widths=[784,64,10]", "train.lr=0.1", "model.k=0.5", "seed=2"]
    # a list-valued axis (commas inside brackets stay in one value), a stepped range, two axes sharing a last part
    grid = sweep_mod.parse({}, ["model.widths=[784,64,10],[784,128,10]", "seed=0:6:2", "train.k=1,2", "model.k=0.3,0.7"])
    assert grid.axes["model.widths"] == [[784, 64, 10], [784, 128, 10]] and grid.axes["seed"] == [0, 2, 4]
    names = list(sweep_mod.run_names(grid))
    assert names[0] == "widths784x64x10-seed0-train_k1-model_k0.3" and len(names) == 2 * 3 * 2 * 2


def test_the_yaml_sweep_section_and_the_command_line_winning():
    base = {"sweep": {"model.k": [0.1, 0.3], "seed": "0:2", "train.epochs": 3}}
    grid = sweep_mod.parse(base, ["model.k=0.5,0.9"])
    assert grid.axes == {"seed": [0, 1], "model.k": [0.5, 0.9]} and grid.fixed == ["train.epochs=3"]
    assert sweep_mod.parse(base, ["seed=4"]).axes == {"model.k": [0.1, 0.3]}  # a single value fixes the key


@pytest.mark.parametrize("args, message", [
    (["train.epochs=2"], "the grid is empty"),
    (["seed=3:3"], "seed: the grid gives it no values"),
    (["seed=0:3:0"], "a range's step must be at least 1"),
    (["model.k=0.1,1.5"], "run k1.5 (model.k=1.5): model.k: expected a fraction in (0, 1], got 1.5"),
    (["model.kk=0.1,0.2"], "run kk0.1 (model.kk=0.1): model.kk: unknown key"),
    (["model.k=0.1,[0.2"], "is not a valid YAML value"),
    (["model.k=0.1,0.10"], "two runs of the grid would both be named 'k0.1'"),
])
def test_bad_grids_are_one_line_exit_2_and_start_nothing(tmp_path, args, message):
    out = scoretrain("sweep", FC, *args, "--runs-dir", str(tmp_path / "s"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (tmp_path / "s").exists()


def test_a_slurm_launcher_without_sbatch_or_submitit_is_refused(tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + ":/nonexistent")
    out = scoretrain("sweep", FC, *GRID, "--launcher", "slurm", "--runs-dir", str(tmp_path / "s"), env=env)
    assert out.returncode == 2 and "sbatch is not on PATH" in out.stderr and out.stderr.count("\n") == 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    (tmp_path / "nosubmitit").mkdir()
    (tmp_path / "nosubmitit" / "submitit.py").write_text("raise ImportError('No module named submitit')\n")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "nosubmitit"), str(REPO)]))
    out = scoretrain("sweep", FC, *GRID, "--launcher", "slurm", "--runs-dir", str(tmp_path / "s"), env=env)
    assert out.returncode == 2 and "needs submitit" in out.stderr and "scoretrain[slurm]" in out.stderr
    assert not (tmp_path / "s").exists()


# --- the local pool and the ledger ----------------------------------------------------------------


def test_the_pool_trains_each_run_as_fit_would(uninterrupted, tmp_path):
    record = sweep_mod.read(uninterrupted)
    assert list(record.runs) == NAMES and record.launcher == {"kind": "local", "jobs": 2, "gpus": None}
    for name in NAMES:
        assert store.load_summary(uninterrupted / name).attrs["status"] == "completed"
    # the same run by hand, with fit and a worker's BLAS threads (the cores shared among the jobs): the same bits
    name, overrides = NAMES[2], record.runs[NAMES[2]]
    out = scoretrain("fit", FC, *overrides, "--runs-dir", str(tmp_path), "--name", name, "-q", env=POOL_ENV)
    assert out.returncode == 0, out.stderr
    assert_identical(uninterrupted / name, tmp_path / name)
    assert POOL_ENV["OPENBLAS_NUM_THREADS"] == POOL_ENV["OMP_NUM_THREADS"] == str(THREADS)


def test_a_workers_blas_threads_follow_from_jobs_not_from_the_runs_left(tmp_path, monkeypatch):
    """One run left with --jobs 2 (a resumed sweep's last run, say) trains with the threads every
    run of that sweep had: the bits depend on them. (The workers here print their threads.)"""
    show = "import os; print(os.environ['OPENBLAS_NUM_THREADS'], os.environ['OMP_NUM_THREADS'])"
    monkeypatch.setattr(sweep_mod, "worker_command", lambda sweep_dir, name, retry: [sys.executable, "-c", show])
    for names in (["a", "b"], ["c"]):
        codes = sweep_mod.run_local(tmp_path, names, 2, None, lambda *a: None)
        assert codes == dict.fromkeys(names, 0)
    for name in "abc":
        assert (tmp_path / sweep_mod.LOGS / f"{name}.log").read_text().split() == [str(THREADS)] * 2


def test_a_gpu_pool_gives_each_worker_one_device_and_its_share_of_the_cores():
    env = sweep_mod.worker_env(3, "1")
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["OPENBLAS_NUM_THREADS"] == env["NUMBA_NUM_THREADS"] == "3"
    assert "CUDA_VISIBLE_DEVICES" not in sweep_mod.worker_env(1) or os.environ.get("CUDA_VISIBLE_DEVICES") is not None
    out = scoretrain("sweep", FC, *GRID, "--gpus", "0,x", "--dry-run")
    assert out.returncode == 2 and "--gpus '0,x': expected device ids" in out.stderr


def test_running_it_again_trains_nothing_and_changes_nothing(uninterrupted, tmp_path):
    folder = tmp_path / "sweep"
    import shutil

    shutil.copytree(uninterrupted, folder)
    before = digests(folder)
    out = scoretrain("sweep", FC, *GRID, *BASE, "--jobs", "2", "--runs-dir", str(folder))
    assert out.returncode == 0 and "all 4 runs are completed; nothing to train" in out.stderr
    assert digests(folder) == before
    status = scoretrain("sweep", "--status", str(folder))
    assert status.returncode == 0 and "4 runs: 4 completed" in status.stdout
    # another grid over the folder: refused, unless --extend adds its runs
    out = scoretrain("sweep", FC, "model.k=0.1,0.9", "seed=0:2", *BASE, "--runs-dir", str(folder))
    assert out.returncode == 1 and "add --extend" in out.stderr
    out = scoretrain("sweep", FC, "model.k=0.1,0.9", "seed=0:2", *BASE, "--runs-dir", str(folder), "--extend", "--dry-run")
    assert out.returncode == 0 and "4 runs: 2 completed, 2 missing" in out.stdout
    out = scoretrain("sweep", FC, *GRID, *BASE[:-1], "train.epochs=3", "--runs-dir", str(folder), "--extend")
    assert out.returncode == 1 and "give this sweep its own --runs-dir" in out.stderr
    assert digests(folder) == before


def test_killed_midway_it_resumes_to_the_same_results(uninterrupted, tmp_path):
    """SIGKILL to the sweep and its workers while one run is at epoch 1 and another is done:
    the same command again leaves the completed runs' files as they were, resumes the
    interrupted one, starts the missing, and every run ends bit-identical to an uninterrupted sweep."""
    folder = tmp_path / "sweep"
    env = hooked_env(tmp_path, NAMES[2])
    proc = subprocess.Popen([sys.executable, "-m", "scoretrain", "sweep", FC, *GRID, *BASE, "--jobs", "2", "--runs-dir", str(folder)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: (tmp_path / "paused").exists(), "run 3 paused after epoch 1", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    wait_for(lambda: not any(store.held(folder / n) for n in NAMES), "the killed workers' locks to go")
    # the states at the kill (run 4, started when another ended, may have ended too since the pause)
    states = {n: sweep_mod.state(folder / n)[0] for n in NAMES}
    assert sweep_mod.state(folder / NAMES[2])[:2] == ("interrupted", 1)
    assert "completed" in states.values(), states  # (run 3 started when one had ended)
    done = [n for n, s in states.items() if s == "completed"]
    before = {k: v for k, v in digests(folder).items() if k.split("/")[0] in done}
    out = scoretrain("sweep", FC, *GRID, *BASE, "--jobs", "2", "--runs-dir", str(folder))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{4 - len(done)} of 4 runs to train" in out.stderr
    after = digests(folder)
    assert all(after[k] == v for k, v in before.items()), "a completed run's files changed"
    for name in NAMES:
        assert_identical(folder / name, uninterrupted / name)


def test_two_sweeps_at_once_train_every_run_exactly_once(tmp_path):
    folder = tmp_path / "sweep"
    args = [sys.executable, "-m", "scoretrain", "sweep", FC, *GRID, *SMALL, "--jobs", "1", "--runs-dir", str(folder)]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for name in NAMES:
        log = (folder / sweep_mod.LOGS / f"{name}.log").read_text()
        assert log.count("written to") == 1, log  # one fit's summary: trained once
        assert log.count("skipped") == 1, log  # the other sweep's worker found it taken or done
        run = store.load_summary(folder / name)
        assert run.attrs["status"] == "completed" and run.metrics["epoch"] == [1, 2]


def test_a_sweep_stopped_by_sigterm_leaves_its_runs_resumable(tmp_path):
    folder = tmp_path / "sweep"
    env = hooked_env(tmp_path, NAMES[0])
    proc = subprocess.Popen([sys.executable, "-m", "scoretrain", "sweep", FC, *GRID, *BASE, "--runs-dir", str(folder)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "paused").exists(), "run 1 paused", proc)
    proc.send_signal(signal.SIGTERM)
    (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert f"continue with: scoretrain sweep {FC} {' '.join(GRID)}" in err.splitlines()[-1], err  # how to go on
    assert sweep_mod.state(folder / NAMES[0])[0] == "interrupted"
    assert all(sweep_mod.state(folder / n)[0] == "missing" for n in NAMES[1:])


# --- compare --group-by ----------------------------------------------------------------------------


def test_compare_group_by_gives_mean_and_std_over_seeds(uninterrupted, tmp_path):
    out = scoretrain("compare", str(uninterrupted), "--json")
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    out = scoretrain("compare", str(uninterrupted), "--group-by", "model.k", "--json")
    assert out.returncode == 0, out.stderr
    groups = json.loads(out.stdout)
    assert [g["model.k"] for g in groups] == [0.1, 0.5]
    for g in groups:
        members = [r for r in rows.values() if r["k"] == g["model.k"]]
        finals = [r["final_test_acc"] for r in members]
        assert g["n"] == g["runs"] == 2
        assert g["final_mean"] == pytest.approx(statistics.fmean(finals), abs=1e-12)
        assert g["final_std"] == pytest.approx(statistics.stdev(finals), abs=1e-12)
        assert g["best_mean"] == pytest.approx(statistics.fmean(r["best_test_acc"] for r in members), abs=1e-12)
        assert g["best_by"] == "test"
    table = scoretrain("compare", str(uninterrupted), "--group-by", "model.k", "--plot", str(tmp_path / "k.png"))
    assert table.returncode == 0 and "± " in table.stdout and (tmp_path / "k.png").stat().st_size > 10_000
    csv = scoretrain("compare", str(uninterrupted), "--group-by", "model.k,seed", "--csv").stdout.splitlines()
    assert csv[0].startswith("model.k,seed,n,runs,final_mean") and len(csv) == 5
    bad = scoretrain("compare", str(uninterrupted), "--group-by", "model.kk")
    assert bad.returncode == 2 and "not a config key" in bad.stderr
    bad = scoretrain("compare", str(uninterrupted), "--group-by", "model")
    assert bad.returncode == 2 and "a section, not a key" in bad.stderr


def test_group_by_selects_by_validation_where_runs_have_a_split(tmp_path):
    folder = tmp_path / "sweep"
    out = scoretrain("sweep", FC, "model.k=0.3", "seed=0:2", *SMALL, "data.val_samples=500", "--runs-dir", str(folder))
    assert out.returncode == 0, out.stderr
    rows = json.loads(scoretrain("compare", str(folder), "--json").stdout)
    g = json.loads(scoretrain("compare", str(folder), "--group-by", "model.k", "--json").stdout)[0]
    assert g["best_by"] == "val"
    assert g["best_mean"] == pytest.approx(statistics.fmean(r["test_at_best_val"] for r in rows), abs=1e-12)


# --- a real Slurm cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


def test_slurm_job_array_trains_the_sweep(slurm, uninterrupted, tmp_path):
    folder = tmp_path / "sweep"
    out = scoretrain("sweep", FC, *GRID, *BASE, "--launcher", "slurm", "--time", "10", "--cpus-per-run", str(THREADS), "--mem", "500M", "--slurm", "comment=scoretrain-test", "--wait",
                     "--runs-dir", str(folder), env=slurm.env)
    assert out.returncode == 0, out.stdout + out.stderr + slurm.logs()
    assert "submitted Slurm job array" in out.stderr and "4 runs: 4 completed" in out.stdout
    for name in NAMES:
        assert_identical(folder / name, uninterrupted / name)
    script = next((folder / sweep_mod.SLURM_DIR).glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-3" in script and f"export OPENBLAS_NUM_THREADS={THREADS}" in script
    assert "#SBATCH --mem=500M" in script and "#SBATCH --comment=scoretrain-test" in script and "#SBATCH --time=10" in script
    out = scoretrain("sweep", FC, *GRID, *BASE, "--launcher", "slurm", "--runs-dir", str(folder), env=slurm.env)
    assert out.returncode == 0 and "nothing to train" in out.stderr  # nothing submitted


def test_a_requeued_slurm_task_resumes_its_run_and_trains_it_once(slurm, uninterrupted, tmp_path):
    folder = tmp_path / "sweep"
    env = dict(hooked_env(tmp_path, NAMES[1]), SLURM_CONF=slurm.env["SLURM_CONF"])
    out = scoretrain("sweep", FC, *GRID, *BASE, "--launcher", "slurm", "--time", "10", "--cpus-per-run", str(THREADS),
                     "--runs-dir", str(folder), env=env)
    assert out.returncode == 0, out.stderr + slurm.logs()
    job = out.stderr.split("job array ")[1].split(":")[0]
    wait_for(lambda: (tmp_path / "paused").exists(), "run 2 paused after epoch 1")
    requeue = subprocess.run(["scontrol", "requeue", f"{job}_1"], env=slurm.env, capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    deadline = time.monotonic() + 120
    # The paused worker ignores the requeue's SIGTERM (it stops between batches, and it is in none),
    # so Slurm kills it KillWait seconds later: run.h5 keeps epoch 1, and the task starts again.
    while subprocess.run(["squeue", "-h", "-r", "-j", job], env=slurm.env, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the job array never ended\n" + slurm.logs()
        # (Slurm holds a requeued task back for two minutes, BeginTime: let it start once it is pending)
        subprocess.run(["scontrol", "update", f"JobId={job}_1", "StartTime=now"], env=slurm.env, capture_output=True)
        time.sleep(0.5)
    log = (folder / sweep_mod.LOGS / f"{NAMES[1]}.log").read_text()
    assert log.count("written to") == 1, log  # one fit finished it: the first never did, the second resumed it
    for name in NAMES:  # one row per epoch, the bits of an uninterrupted run
        assert_identical(folder / name, uninterrupted / name)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_plan_and_fit_refuses_them(path):
    plan = sweep_mod.plan(path, [])
    assert len(plan.runs) > 1 and all(name for name in plan.runs)
    out = scoretrain("fit", str(path))
    assert out.returncode == 2 and "train it with `scoretrain sweep FILE`" in out.stderr


# --- mistakes and faults: what the grid means, failed runs, the exit code, folders --------------


def test_a_nested_sweep_section_long_names_and_equal_values():
    grid = sweep_mod.parse({"sweep": {"model": {"k": [0.1, 0.3]}, "seed": "0:2"}}, [])
    assert grid.axes == {"model.k": [0.1, 0.3], "seed": [0, 1]}
    widths = [f"[784,{','.join(['16'] * n)},10]" for n in (40, 41)]  # names of 170 and more characters
    runs = sweep_mod.run_names(sweep_mod.parse({}, ["model.widths=" + ",".join(widths)]))
    assert len(runs) == 2 and all(len(n) <= sweep_mod.NAME_LIMIT and n[-13] == "-" for n in runs)
    assert list(sweep_mod.run_names(sweep_mod.parse({}, ["model.widths=" + ",".join(widths)]))) == list(runs)  # the same each time
    assert [o[-1] for o in runs.values()] == [f"model.widths={json.dumps(json.loads(w))}" for w in widths]  # sweep.yaml keeps them whole
    with pytest.raises(sweep_mod.ConfigError, match=r"runs lr0.1 \(train.lr=0.1\) and lr1e-1 \(train.lr=1e-1\) are the same spec"):
        sweep_mod.plan(REPO / FC, ["train.lr=0.1,1e-1", *SMALL])


# In every Python process of a sweep: the worker of run $ST_FAIL_RUN runs out of memory after
# epoch 1, once (a fault that a second try does not meet).
FAIL_ONCE = r"""
import os, sys
from pathlib import Path
if "sweep-worker" in sys.argv and os.environ.get("ST_FAIL_RUN") in sys.argv:
    flag = Path(os.environ["ST_HOOK"]) / "failed-once"
    from scoretrain.run import progress
    end = progress.Reporter.epoch_end
    def epoch_end(self, row, *a, **k):
        end(self, row, *a, **k)
        if row["epoch"] == 1 and not flag.exists():
            flag.touch()
            raise MemoryError("an allocation failed")
    progress.Reporter.epoch_end = epoch_end
"""


def test_a_failed_run_is_said_with_its_reason_and_retried_only_when_asked(tmp_path):
    folder = tmp_path / "sweep"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FAIL_ONCE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(REPO)]), ST_HOOK=str(tmp_path), ST_FAIL_RUN="k0.3")
    args = ["sweep", FC, "model.k=0.1,0.3", *SMALL, "--runs-dir", str(folder)]
    out = scoretrain(*args, env=env)
    assert out.returncode == 1 and "1 failed (k0.3): add --retry-failed to train it again" in out.stderr, out.stderr
    for again in (args, [*args, "--dry-run"], ["sweep", "--status", str(folder)]):
        out = scoretrain(*again, env=env)
        assert "k0.3: failed: out of memory (an allocation failed)" in out.stdout, out.stdout
    out = scoretrain(*args, env=env)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr  # whatever the rerun skipped
    assert "nothing to train: 1 of 2 runs did not complete: 1 failed (k0.3)" in out.stderr
    out = scoretrain(*args, "--retry-failed", env=env)
    assert out.returncode == 0, out.stderr
    assert "1 of 2 runs to train" in out.stderr and "2 runs: 2 completed" in out.stdout
    run = store.load_summary(folder / "k0.3")
    assert run.attrs["status"] == "completed" and run.metrics["epoch"] == [1, 2]  # resumed from its last finished epoch


def test_a_run_whose_data_is_missing_leaves_no_folder(tmp_path):
    """The sweep command refuses missing data before anything exists; a worker that meets it (the
    data removed since) fails in one line and leaves no empty run folder behind."""
    folder = tmp_path / "sweep"
    out = scoretrain("sweep", FC, "model.k=0.1,0.3", *SMALL, f"data.root={tmp_path / 'nodata'}", "--runs-dir", str(folder))
    assert out.returncode == 1 and "files not found" in out.stderr and out.stderr.count("\n") == 1
    assert not folder.exists()
    plan = sweep_mod.plan(REPO / FC, ["model.k=0.1,0.3", *SMALL, f"data.root={tmp_path / 'nodata'}"])
    sweep_mod.settle(folder, plan, False)
    out = scoretrain("sweep-worker", str(folder), "k0.1")
    assert out.returncode == 1 and "files not found" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["sweep.yaml"]


def test_a_refused_job_array_leaves_the_folder_as_it_was(tmp_path):
    """sbatch refuses the array (a bad partition): one line, and the new sweep folder is gone."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = scoretrain("sweep", FC, "model.k=0.1,0.3", *SMALL, "--launcher", "slurm", "--partition", "nope",
                     "--runs-dir", str(tmp_path / "s"), env=env)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "Slurm refused the job array: sbatch: error: invalid partition specified: nope" in out.stderr
    assert not (tmp_path / "s").exists()
