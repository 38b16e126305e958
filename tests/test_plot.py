"""`scoretrain compare --plot`: real PNG and SVG files, the lines in each panel, and the one-line
error without matplotlib."""

import json
import shutil
import sys
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from scoretrain.commands import compare as compare_mod
from scoretrain.commands import plot as plot_mod
from scoretrain.cli import app

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runs(sweep):
    """A sweep: edge-popup at k 0.3 and 0.7, biprop at k 0.5 (2 epochs each), dense (1 epoch)."""
    return sweep("plot-sweep", [["model.k=0.3", "--name", "ep-k0.3"], ["model.k=0.7", "--name", "ep-k0.7"],
                                ["model.method=biprop", "model.k=0.5", "--name", "bp-k0.5"],
                                ["model.method=dense", "train.epochs=1", "--name", "dense"]])


def rows(path):
    return compare_mod.sort_rows(compare_mod.collect([path]), "k")


def legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_png_with_a_line_per_group_and_a_line_per_run(runs, tmp_path):
    pytest.importorskip("matplotlib")
    fig = plot_mod.plot(rows(runs), tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG
    by_k, by_epoch = fig.axes
    # k sweeps of edge-popup (2 runs) and biprop (1 run); dense has no k: a horizontal line
    assert len(by_k.get_lines()) == 3 and legend(by_k) == ["edge-popup", "biprop", "dense"]
    ep = by_k.get_lines()[0]
    acc = {r["name"]: 100 * r["final_test_acc"] for r in rows(runs)}
    assert list(ep.get_xdata()) == [0.3, 0.7] and list(ep.get_ydata()) == [acc["ep-k0.3"], acc["ep-k0.7"]]
    assert list(by_k.get_lines()[2].get_ydata()) == [acc["dense"]] * 2
    assert "784-64-10 signed_constant" in by_k.get_title()  # what the groups share
    assert len(by_epoch.get_lines()) == 4 and sorted(legend(by_epoch)) == ["bp-k0.5", "dense", "ep-k0.3", "ep-k0.7"]
    dense = by_epoch.get_lines()[legend(by_epoch).index("dense")]
    assert list(dense.get_xdata()) == [1] and list(dense.get_ydata()) == [acc["dense"]]
    # a run's colour is its group's
    assert by_epoch.get_lines()[legend(by_epoch).index("ep-k0.7")].get_color() == ep.get_color()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "sweep.png"]  # no temporary file left


def test_svg_and_runs_at_the_same_k(runs, tmp_path):
    pytest.importorskip("matplotlib")
    shutil.copytree(runs / "ep-k0.3", runs / "ep-k0.3-again")  # e.g. another seed: the same k twice
    shutil.copytree(runs / "ep-k0.3", runs / "not-yet")
    import h5py

    with h5py.File(runs / "not-yet" / "run.h5", "r+") as f:  # a run with no finished epoch: not drawn
        for key in f["metrics"]:
            f["metrics"][key].resize((0,))
    fig = plot_mod.plot(rows(runs), tmp_path / "sweep.svg")
    assert ET.parse(tmp_path / "sweep.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    by_k, by_epoch = fig.axes
    assert len(by_k.get_lines()) == 3 and len(by_k.collections) == 1  # the two runs at k 0.3: one mean, two dots
    assert len(by_epoch.get_lines()) == 5 and "not-yet" not in legend(by_epoch)


def test_through_the_cli(runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.svg"
    result = runner.invoke(app, ["compare", str(runs), "--json", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads(result.stdout)] == ["ep-k0.3", "bp-k0.5", "ep-k0.7", "dense"]  # stdout: JSON only
    assert result.stderr.strip() == f"plot written to {out}"
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()
    result = runner.invoke(app, ["compare", str(runs), "--plot", str(tmp_path / "sweep.png")])
    assert result.exit_code == 0 and "ep-k0.3" in result.stdout
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG


def test_bad_plot_file_names(runs, tmp_path):
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, ["compare", str(runs), "--plot", str(tmp_path / "sweep.jpeg")])
    assert result.exit_code == 2 and result.stdout == "" and "expected a .png or .svg" in result.stderr
    result = runner.invoke(app, ["compare", str(runs), "--json", "--plot", str(tmp_path / "missing" / "sweep.png")])
    assert result.exit_code == 1 and result.stderr.startswith("error: --plot") and "cannot write" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_without_matplotlib_one_line_tells_how_to_install_it(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = runner.invoke(app, ["compare", str(runs), "--plot", str(tmp_path / "sweep.png")])
    assert result.exit_code == 1 and result.stdout == ""  # refused before any run is read or printed
    assert result.stderr.startswith("error: ") and "pip install 'scoretrain[plot]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "sweep.png").exists()
    assert runner.invoke(app, ["compare", str(runs)]).exit_code == 0  # compare itself needs no matplotlib


def test_labels_name_only_what_differs():
    keys = [("edge-popup", "784-64-10", "signed_constant", None, None), ("edge-popup", "lenet x0.25", "signed_constant", None, None),
            ("edge-popup", "784-64-10", "signed_constant", "global", None), ("edge-popup", "784-64-10", "signed_constant", None, "scaled")]
    names, shared = plot_mod.labels(keys)
    assert list(names.values()) == ["784-64-10", "lenet x0.25", "784-64-10 global k", "784-64-10 scaled init"]
    assert shared == "edge-popup signed_constant"
    assert plot_mod.labels(keys[:1]) == ({keys[0]: "edge-popup"}, "784-64-10 signed_constant")


def test_compare_rows_know_arch_and_which_methods_have_k(runs):
    by_name = {r["name"]: r for r in rows(runs)}
    assert by_name["bp-k0.5"]["k"] == 0.5 and by_name["bp-k0.5"]["k_scope"] == "layer"  # biprop keeps a fraction k too
    assert by_name["dense"]["k"] is None and by_name["dense"]["k_scope"] is None
    assert by_name["ep-k0.3"]["arch"] == "mlp" and by_name["ep-k0.3"]["width"] is None
    assert compare_mod.net_name(dict(by_name["ep-k0.3"], widths=None, arch="lenet", width=0.25)) == "lenet x0.25"


def test_nothing_to_plot_is_one_line(runs, tmp_path):
    pytest.importorskip("matplotlib")
    import h5py

    with h5py.File(runs / "dense" / "run.h5", "r+") as f:  # just started: no epoch finished yet
        for key in f["metrics"]:
            f["metrics"][key].resize((0,))
        f.attrs["epochs_done"] = 0
    result = runner.invoke(app, ["compare", str(runs / "dense"), "--plot", str(tmp_path / "sweep.png")])
    assert result.exit_code == 1 and "no run has a finished epoch to plot" in result.stderr
    assert not (tmp_path / "sweep.png").exists()
