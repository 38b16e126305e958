"""IteRand (model.method: iterand): edge-popup whose pruned weights are redrawn from the init
every rerand_freq optimizer steps, each with probability rerand_rate. The draws follow from
(seed, step) alone, so the CPU, the CuPy code path and a resumed run redraw the same."""


import numpy as np
import pytest

from conftest import FC, assert_identical, stopped_run
from scoretrain.nn import optim
from scoretrain.run import store
from scoretrain.run.config import ModelConfig, TrainConfig
from scoretrain.nn.model import Network, init_network
from scoretrain.run.step import train_step
from test_model import ForeignNumpy

CFG = ModelConfig(method="iterand", widths=[784, 64, 32, 10], k=0.3, rerand_freq=3, rerand_rate=0.25, init="kaiming_normal")


def batches(n=8):
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((16, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 16)) for _ in range(n)]


def trained(xp, cfg=CFG, seed=0, steps=8):
    w, s = init_network(cfg, seed)
    net = Network(xp, cfg, w, s)
    opt = optim.make(xp, net.params, TrainConfig())
    net.reseed(seed, 0)
    history = []
    for x, y in batches(steps):
        before = net.w_flat.copy()
        train_step(net, opt, x, y, 0.1)
        net.effective_weights(train=False)  # the exact masks the step's redraw (if any) saw
        history.append((before, net.w_flat.copy(), net.m_flat.copy(), opt.steps))
    return net, history


def test_only_pruned_weights_are_redrawn_every_rerand_freq_steps_at_the_rate():
    net, history = trained(np)
    for before, after, mask, step in history:
        changed = before != after
        if step % CFG.rerand_freq:
            assert not changed.any(), f"weights changed at step {step}"
            continue
        assert not (changed & mask).any()  # a kept weight is never redrawn
        fresh = changed.sum() / (~mask).sum()  # Kaiming-normal draws: a redrawn weight differs
        assert 0.2 < fresh < 0.3, fresh
    assert sum(step % CFG.rerand_freq == 0 for *_, step in history) == 2


def test_a_redraw_leaves_the_subnetwork_it_is_drawn_for_unchanged():
    w, s = init_network(CFG, 0)
    net = Network(np, CFG, w, s)
    w_eff = [a.copy() for a in net.effective_weights(train=False)]
    before = net.w_flat.copy()
    net.method.rerandomize(net, 3)
    assert not np.array_equal(before, net.w_flat)
    for a, b in zip(w_eff, net.effective_weights(train=False)):
        np.testing.assert_array_equal(a, b)


def test_the_draws_follow_from_seed_and_step_on_both_code_paths():
    (_, cpu), (_, dev) = trained(np), trained(ForeignNumpy())
    for (_, a, ma, _), (_, b, mb, _) in zip(cpu, dev):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ma, mb)
    _, other = trained(np, seed=1)
    assert not np.array_equal(cpu[-1][1], other[-1][1])


@pytest.mark.parametrize("overrides,fragment", [
    (["model.rerand_freq=0"], "model.rerand_freq: expected a positive integer, got 0"),
    (["model.rerand_rate=0"], "model.rerand_rate: expected a probability in (0, 1], got 0.0"),
    (["model.rerand_rate=1.5"], "model.rerand_rate: expected a probability in (0, 1], got 1.5"),
])
def test_bad_rerandomization_settings_are_refused(tmp_path, small, overrides, fragment):
    from typer.testing import CliRunner

    from scoretrain.cli import app

    result = CliRunner().invoke(app, ["fit", FC, *small, "model.method=iterand", *overrides, "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and fragment in result.stderr, result.output


def test_an_iterand_run_stores_its_weights_and_resumes_bit_identically(tmp_path, small, reference):
    from typer.testing import CliRunner

    from scoretrain.cli import app

    extra = ("model.method=iterand", "model.rerand_freq=7")
    run_dir = stopped_run(tmp_path, small, *extra)
    w0, _ = init_network(ModelConfig(method="iterand", widths=[784, 64, 10]), 0)
    assert any(not np.array_equal(a, b) for a, b in zip(store.load(run_dir).weights, w0))  # epoch 1's redraws are stored
    assert CliRunner().invoke(app, ["fit", "--resume", str(run_dir), "-q"]).exit_code == 0
    assert_identical(run_dir, reference("sgd", *extra))
