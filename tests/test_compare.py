"""`scoretrain compare`: small real runs made through the CLI, compared, and checked against run.h5."""

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys

import h5py
import pytest
from typer.testing import CliRunner

from scoretrain.run import store
from scoretrain.cli import app

runner = CliRunner()


@pytest.fixture
def runs(sweep):
    """A folder of runs: k0.3 and k0.7 (edge-popup, 2 epochs) and dense (1 epoch)."""
    return sweep("sweep", [["model.k=0.7", "--name", "k0.7"], ["model.k=0.3", "--name", "k0.3"],
                           ["model.method=dense", "train.epochs=1", "--name", "dense"]])


def compare(*args):
    return runner.invoke(app, ["compare", *map(str, args)])


def rows_of(*args) -> list[dict]:
    result = compare(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def names(*args) -> list[str]:
    return [r["name"] for r in rows_of(*args)]


def test_json_reports_what_run_h5_holds(runs):
    rows = rows_of(runs)
    assert [r["name"] for r in rows] == ["k0.3", "k0.7", "dense"]  # default: by k, dense (no k) last
    for row in rows:
        run = store.load(runs / row["name"])
        m = run.metrics
        best = m["test_acc"].index(max(m["test_acc"]))
        assert row["best_test_acc"] == m["test_acc"][best] and row["best_epoch"] == m["epoch"][best]
        assert row["final_test_acc"] == m["test_acc"][-1]
        assert row["seconds_per_epoch"] == pytest.approx(sum(m["epoch_seconds"]) / len(m["epoch_seconds"]), rel=1e-12)
        assert row["epochs_done"] == run.epochs_done and row["status"] == "completed" and row["error"] is None
        assert row["widths"] == [784, 64, 10] and row["init"] == "signed_constant"
        assert row["path"] == str(runs / row["name"])
    assert [(r["method"], r["k"], r["epochs"]) for r in rows] == [("edge-popup", 0.3, 2), ("edge-popup", 0.7, 2), ("dense", None, 1)]


def test_csv_has_full_precision_and_the_table_one_line_per_run(runs):
    result = compare(runs, "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["name"] for r in rows] == ["k0.3", "k0.7", "dense"]
    for row in rows:
        m = store.load(runs / row["name"]).metrics
        assert float(row["final_test_acc"]) == m["test_acc"][-1]  # exactly: no rounding for scripts
        assert float(row["seconds_per_epoch"]) == pytest.approx(sum(m["epoch_seconds"]) / len(m["epoch_seconds"]), rel=1e-12)
        assert row["widths"] == "784-64-10" and row["error"] == ""
    assert rows[2]["k"] == "" and rows[0]["k"] == "0.3"

    result = compare(runs)
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert "run" in lines[0] and "best (epoch)" in lines[0] and "s/epoch" in lines[0]
    for name, epochs in (("k0.3", "2/2"), ("k0.7", "2/2"), ("dense", "1/1")):
        m = store.load(runs / name).metrics
        line = next(line for line in lines if line.startswith(name + " "))  # not squeezed into 80 columns
        best = max(m["test_acc"])
        assert f"{100 * m['test_acc'][-1]:.2f}%" in line and f"{100 * best:.2f}% ({m['test_acc'].index(best) + 1})" in line
        assert epochs in line and "completed" in line


def test_sort_keys(runs):
    final = {r["name"]: r["final_test_acc"] for r in rows_of(runs)}
    assert names(runs, "--sort", "final") == sorted(final, key=final.get, reverse=True)  # best first
    assert names(runs, "--sort", "name") == ["dense", "k0.3", "k0.7"]
    assert names(runs, "--sort", "k") == ["k0.3", "k0.7", "dense"]
    assert names(runs, "--sort", "epochs") == ["dense", "k0.3", "k0.7"]  # 1 epoch first; ties by name
    result = compare(runs, "--sort", "accuracy")
    assert result.exit_code == 2 and "--sort: expected one of name," in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_folder_scan_lists_a_corrupt_run_as_unreadable_and_shows_the_others(runs):
    shutil.copytree(runs / "k0.3", runs / "broken")
    data = (runs / "broken" / "run.h5").read_bytes()
    (runs / "broken" / "run.h5").write_bytes(data[: len(data) // 2])
    (runs / "notes").mkdir()  # no run files: not a run, not listed
    (runs / "README").write_text("a sweep")
    rows = rows_of(runs)
    assert [r["name"] for r in rows] == ["k0.3", "k0.7", "dense", "broken"]  # no values: last
    assert rows[3]["status"] == "unreadable" and "corrupt or truncated run file" in rows[3]["error"]
    assert rows[3]["final_test_acc"] is None
    result = compare(runs)
    assert result.exit_code == 0
    assert any(line.startswith("broken ") and "unreadable" in line for line in result.stdout.splitlines())
    assert result.stderr.startswith("unreadable: ") and "broken" in result.stderr
    # named on the command line, the same run is an error
    result = compare(runs / "k0.3", runs / "broken")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "corrupt or truncated" in result.stderr


def test_runs_and_folders_mix_and_each_run_is_listed_once(runs, tmp_path):
    shutil.copytree(runs / "k0.7", tmp_path / "elsewhere")
    assert names(runs / "k0.7", runs, tmp_path / "elsewhere", "--sort", "name") == ["dense", "elsewhere", "k0.3", "k0.7"]


def test_running_and_interrupted_runs(runs):
    run = store.load(runs / "k0.7")
    run.attrs.update(status="running", pid=os.getpid(), host=socket.gethostname())
    run.metrics = {key: values[:1] for key, values in run.metrics.items()}  # mid-training: 1 of 2 epochs
    store.save(runs / "k0.7", run)
    row = rows_of(runs / "k0.7")[0]
    assert row["status"] == "running" and row["epochs_done"] == 1 and row["epochs"] == 2
    assert row["final_test_acc"] == run.metrics["test_acc"][0]

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run.attrs["pid"] = gone.pid
    store.save(runs / "k0.7", run)
    assert rows_of(runs / "k0.7")[0]["status"] == "interrupted"
    run.attrs["host"] = "another-machine"  # its pid cannot be checked from here
    store.save(runs / "k0.7", run)
    assert rows_of(runs / "k0.7")[0]["status"] == "running"

    run.metrics = {key: [] for key in store.METRICS}  # just started: no epoch finished yet
    store.save(runs / "k0.7", run)
    row = rows_of(runs / "k0.7")[0]
    assert row["epochs_done"] == 0 and row["best_test_acc"] is None and row["seconds_per_epoch"] is None
    assert "0/2" in compare(runs / "k0.7").stdout


def test_reads_no_weights(runs):
    with h5py.File(runs / "k0.3" / "run.h5", "r+") as f:
        del f["layers"]  # gone: a reader that touched the weights would fail
    assert rows_of(runs / "k0.3")[0]["status"] == "completed"


def newer_format(runs, tmp):
    with h5py.File(runs / "k0.3" / "run.h5", "r+") as f:
        f.attrs["format_version"] = store.FORMAT_VERSION + 1
    return runs / "k0.3"


def garbage_run_file(runs, tmp):
    (runs / "k0.3" / "run.h5").write_bytes(b"not hdf5")
    return runs / "k0.3"


def no_run_file(runs, tmp):  # as in the moment between `fit` writing config.yaml and the first run.h5
    (runs / "k0.3" / "run.h5").unlink()
    return runs / "k0.3"


def bad_config(runs, tmp):  # a run written before run.h5 kept its spec: config.yaml is all there is
    with h5py.File(runs / "k0.3" / "run.h5", "r+") as f:
        f.attrs.pop("spec", None)
    (runs / "k0.3" / "config.yaml").write_text("model: {k: 7}")
    return runs / "k0.3"


def empty_folder(runs, tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


@pytest.mark.parametrize("make,message", [
    (lambda runs, tmp: tmp / "missing", "no such run directory or folder"),
    (lambda runs, tmp: runs / "k0.3" / "config.yaml", "not a run directory"),
    (empty_folder, "no runs here"),
    (garbage_run_file, "corrupt or truncated run file"),
    (no_run_file, "the run stopped before its first checkpoint (no run.h5)"),
    (newer_format, "format_version 2 is newer"),
    (bad_config, "model.k: expected a fraction"),
])
def test_a_bad_path_is_one_line_and_exit_1(runs, tmp_path, make, message):
    path = make(runs, tmp_path)
    result = compare(runs / "k0.7", path)  # a good run beside it: still no partial table
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_newer_format_in_a_folder_scan_is_unreadable_with_its_reason(runs):
    newer_format(runs, None)
    row = {r["name"]: r for r in rows_of(runs)}["k0.3"]
    assert row["status"] == "unreadable" and "upgrade scoretrain" in row["error"]


def test_csv_and_json_together_are_refused(runs):
    result = compare(runs, "--csv", "--json")
    assert result.exit_code == 2 and "choose one" in result.output


def test_runs_in_sweep_folders_below_are_read_and_named_by_their_path(runs, tmp_path):
    top = tmp_path / "top"
    shutil.copytree(runs, top / "k-sweep")
    (top / "k-sweep" / "sweep.yaml").write_text("format: scoretrain-sweep\n")
    shutil.copytree(runs / "dense", top / "dense")
    (top / "k-sweep" / ".logs" / "k9").mkdir(parents=True)  # dot folders are not searched
    assert sorted(names(top)) == ["dense", "k-sweep/dense", "k-sweep/k0.3", "k-sweep/k0.7"]


def test_group_by_says_which_keys_its_groups_pool(runs):
    result = compare(runs, "--group-by", "model.init", "--json")  # one group: k0.3, k0.7 and dense
    assert result.exit_code == 0, result.output
    [group] = json.loads(result.stdout)
    assert group["runs"] == 3 and group["differs"] == ["model.method", "model.k", "train.epochs"]
    warning = result.stderr.splitlines()
    assert len(warning) == 1 and "1 of 1 groups pool runs that differ in model.method, model.k, train.epochs" in warning[0]
    assert "--group-by model.init,model.method,model.k,train.epochs" in warning[0]
    split = compare(runs, "--group-by", "model.init,model.method,model.k,train.epochs")
    assert split.exit_code == 0 and split.stderr == ""
    assert "differs in" not in split.stdout and "differs in" in compare(runs, "--group-by", "model.init").stdout
