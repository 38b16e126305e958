"""`scoretrain inspect`: per-layer mask, score and sign statistics, checked against run.h5 itself."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import for_arch, merged
from typer.testing import CliRunner

from scoretrain.cli import app

FC = str(Path(__file__).resolve().parent.parent / "configs/mnist_fc.yaml")
runner = CliRunner()
_built = {}

RUNS = {
    "k0.3": ["model.k=0.3", "train.epochs=3"],
    "lenet": ["model.arch=lenet", "model.width=0.25", "train.epochs=1", "model.k_scope=global"],
    "dense": ["model.method=dense", "train.epochs=1"],
}


@pytest.fixture
def runs(small, tmp_path_factory, tmp_path):
    """A copy of the runs for each test (trained once)."""
    if "runs" not in _built:
        folder = tmp_path_factory.mktemp("inspect-runs")
        for name, args in RUNS.items():
            result = runner.invoke(app, ["fit", FC, *merged(for_arch(small, args), args), "--name", name, "--runs-dir", str(folder), "-q"])
            assert result.exit_code == 0, result.output
        _built["runs"] = folder
    shutil.copytree(_built["runs"], tmp_path / "runs")
    return tmp_path / "runs"


def inspect_json(run_dir) -> dict:
    result = runner.invoke(app, ["inspect", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def h5_layers(run_dir):
    with h5py.File(run_dir / "run.h5", "r", locking=False) as f:
        layers = [{key: g[key][()] for key in g} for g in (f["layers"][n] for n in sorted(f["layers"]))]
        return layers, f["metrics/mask_change"][()]


@pytest.mark.parametrize("name", ["k0.3", "lenet"])
def test_masked_run_statistics_match_run_h5(runs, name):
    r = inspect_json(runs / name)
    layers, overall = h5_layers(runs / name)
    assert r["method"] == "edge-popup" and r["epochs_done"] == len(overall) and r["status"] == "completed"
    assert len(r["layers"]) == len(layers)
    kept_total = 0
    for L, g in zip(r["layers"], layers):
        w, s, m = g["weight"], g["scores"].astype(np.float64), g["mask"].astype(bool)
        kept_total += m.sum()
        assert L["kind"] == ("conv" if w.ndim == 4 else "linear") and L["shape"] == list(w.shape)
        assert L["kept"] == m.mean()
        mc = g["mask_change"]
        assert L["mask_change"] == {"first": mc[0], "last": mc[-1], "total": pytest.approx(mc.sum(), rel=1e-12)}
        assert L["scores"] == pytest.approx({"mean": s.mean(), "std": s.std(), "min": s.min(), "max": s.max()}, rel=1e-9)
        assert L["abs_scores_kept"]["mean"] == pytest.approx(np.abs(s[m]).mean(), rel=1e-9)
        assert L["abs_scores_pruned"]["mean"] == pytest.approx(np.abs(s[~m]).mean(), rel=1e-9)
        assert L["kept_positive"] == (w[m] > 0).mean()
        if name == "k0.3":  # a per-layer top-k: every kept |score| is at least every pruned one
            assert L["kept"] == round(0.3 * w.size) / w.size
            assert L["abs_scores_kept"]["min"] >= L["abs_scores_pruned"]["max"]
    assert r["kept"] == pytest.approx(kept_total / sum(g["weight"].size for g in layers), rel=1e-12)
    assert r["mask_change"] == {"first": overall[0], "last": overall[-1], "total": pytest.approx(overall.sum(), rel=1e-12)}
    if name == "lenet":  # k over the whole network: the layers keep different fractions
        assert r["k_scope"] == "global" and r["arch"] == "lenet" and r["widths"] is None and r["width"] == 0.25
        assert len({L["kept"] for L in r["layers"]}) > 1 and r["kept"] == pytest.approx(0.5, abs=1e-6)
        assert [L["kind"] for L in r["layers"]] == ["conv", "conv", "linear", "linear"]


def test_dense_run_has_weight_statistics_only(runs):
    r = inspect_json(runs / "dense")
    layers, overall = h5_layers(runs / "dense")
    assert np.isnan(overall).all()  # what fit records for dense: nothing moved, no mask
    assert r["method"] == "dense" and r["k"] is None and r["kept"] is None and r["mask_change"] is None
    for L, g in zip(r["layers"], layers):
        w = g["weight"].astype(np.float64)
        assert set(L) == {"layer", "kind", "shape", "size", "weights"}
        assert L["weights"] == pytest.approx({"mean": w.mean(), "std": w.std(), "min": w.min(), "max": w.max()}, rel=1e-9)


def test_table(runs):
    result = runner.invoke(app, ["inspect", str(runs / "k0.3")])
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    r = inspect_json(runs / "k0.3")
    assert lines[0].startswith(f"{runs / 'k0.3'}: edge-popup 784-64-10 signed_constant k=0.3, completed, 3 epochs")
    mc = r["mask_change"]
    assert lines[1].startswith(f"kept {100 * r['kept']:.1f}% of the weights; the mask moved "
                               f"{100 * mc['first']:.1f}% / {100 * mc['last']:.1f}% / {100 * mc['total']:.1f}%")
    assert any("mask moved first / last / total" in line and "kept W > 0" in line for line in lines)
    assert any("score mean ± std" in line and "|score| pruned" in line for line in lines)
    for L in r["layers"]:
        row = next(line for line in lines if line.startswith(L["layer"] + " "))  # whole, not squeezed
        mc = L["mask_change"]
        assert f"{100 * mc['first']:.1f}% / {100 * mc['last']:.1f}% / {100 * mc['total']:.1f}%" in row
        assert "x".join(map(str, L["shape"])) in row and f"{100 * L['kept_positive']:.1f}%" in row

    result = runner.invoke(app, ["inspect", str(runs / "dense")])
    assert result.exit_code == 0
    assert "weight mean ± std" in result.stdout and "kept" not in result.stdout and "score mean" not in result.stdout


def old_style(run_dir):
    """As a run written before run.h5 kept a copy of its spec: config.yaml is all there is."""
    with h5py.File(run_dir / "run.h5", "r+") as f:
        f.attrs.pop("spec", None)


def truncate(run_dir):
    data = (run_dir / "run.h5").read_bytes()
    (run_dir / "run.h5").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("make,message", [
    (lambda runs: runs / "missing", "no such run directory"),
    (lambda runs: runs, "not a scoretrain run (no run.h5)"),
    (lambda runs: truncate(runs / "k0.3") or runs / "k0.3", "corrupt or truncated run file"),
    (lambda runs: old_style(runs / "k0.3") or (runs / "k0.3" / "config.yaml").write_text("model: {k: 7}") and runs / "k0.3", "model.k: expected a fraction"),
])
def test_bad_run_is_one_line_and_exit_1(runs, make, message):
    for args in ([], ["--json"]):
        result = runner.invoke(app, ["inspect", str(make(runs)), *args])
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
