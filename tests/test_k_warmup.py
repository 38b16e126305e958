"""The k warm-up (`model.k_warmup_epochs`): the fraction kept falls geometrically from 1 to k over
the first epochs, exactly round(k_e * n) weights in epoch e, a function of the epoch alone, so an
interrupted run reads, evaluates and resumes exactly."""

import json

import pytest
from typer.testing import CliRunner

from conftest import FC, assert_identical, stopped_run
from scoretrain.run import store
from scoretrain.cli import app
from scoretrain.nn.methods import k_at, kept_count

runner = CliRunner()
WARM = ["model.k=0.1", "model.k_warmup_epochs=3"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_k_falls_geometrically_to_k_and_stays():
    assert [k_at(0.1, 3, e) for e in range(5)] == pytest.approx([0.1 ** (1 / 3), 0.1 ** (2 / 3), 0.1, 0.1, 0.1])
    assert k_at(0.1, 3, 2) == 0.1 and [k_at(0.3, 0, e) for e in range(3)] == [0.3] * 3 and k_at(0.5, 1, 0) == 0.5


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_an_interrupted_warm_up_keeps_its_epochs_k_and_resumes_exactly(tmp_path, small, reference, scope):
    extra = (*WARM, f"model.k_scope={scope}")
    run_dir = stopped_run(tmp_path, small, *extra)
    run = store.load(run_dir)
    sizes = [m.size for m in run.masks]
    expected = ([kept_count(k_at(0.1, 3, 0), n) for n in sizes] if scope == "layer" else [kept_count(k_at(0.1, 3, 0), sum(sizes))])
    kept = [int(m.sum()) for m in run.masks]
    assert (kept if scope == "layer" else [sum(kept)]) == expected  # epoch 1's k, exactly
    ev = json.loads(cli("eval", run_dir, "--json").stdout)
    assert ev["matches_record"] and ev["masks_match_scores"]  # eval takes the epoch's k, not the final one
    assert cli("fit", "--resume", run_dir, "-q").exit_code == 0
    assert_identical(run_dir, reference("sgd", *extra))
    final = store.load(run_dir)
    total = sum(int(m.sum()) for m in final.masks)
    assert total == (sum(kept_count(0.1, n) for n in sizes) if scope == "layer" else kept_count(0.1, sum(sizes)))


@pytest.mark.parametrize("overrides,fragment", [
    (["model.method=dense", "model.k_warmup_epochs=2"], "model.k_warmup_epochs: expected 0 for dense"),
    (["model.method=supermask", "model.k_warmup_epochs=2"], "model.k_warmup_epochs: expected 0 for supermask"),
    (["model.k_warmup_epochs=3"], "model.k_warmup_epochs: expected at most train.epochs (2)"),
    (["model.k_warmup_epochs=-1"], "model.k_warmup_epochs: expected an integer >= 0"),
])
def test_a_warm_up_that_cannot_apply_is_refused(tmp_path, small, overrides, fragment):
    result = cli("fit", FC, *small, *overrides, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and fragment in result.stderr and len(result.stderr.splitlines()) == 1, result.output
