"""The training step replayed as a CUDA graph (step.CapturedStep), on the strict CuPy stand-in's
graph simulation (strict_cupy.py): a replay re-runs what the capture recorded, on the same
arrays, with the host values of the capture. Every method and optimizer that CapturedStep
replays gives the bits of the same steps run as they are; the ones it does not replay would
not (the simulation sees their frozen host state), and a capture that fails falls back."""

import numpy as np
import pytest

from scoretrain.data import datasets as data
from scoretrain.nn import optim
from scoretrain.kernels.backend import Backend
from scoretrain.run.config import Config, ModelConfig, TrainConfig
from scoretrain.nn.model import Network, init_network
from scoretrain.run.step import CapturedStep, EagerStep, stepper
from scoretrain.run.train import enter_epoch
from support.strict_cupy import CaptureError, StrictCupy

REPLAYED = {
    "edge-popup": {}, "dense": dict(method="dense"), "biprop": dict(method="biprop"), "global k": dict(k_scope="global"),
    "per filter": dict(score_granularity="filter"), "dense last": dict(dense_last=True),
    "conv": dict(arch="lenet", width=0.125), "k warm-up": dict(k_warmup_epochs=2),
    "resnet, BN": dict(arch="resnet20", width=0.125, bn="nonaffine"), "resnet, affine BN": dict(arch="resnet20", width=0.125, bn="affine"),
}


def train(variant: dict, make_step, optimizer="sgd", epochs=2, extra=None, xp=None):
    """Two epochs of 5 batches of 16 and a last one of 8 (its own shape), augmented, at a new
    learning rate each epoch (the graphs serve both), on the stand-in (or `xp`: CuPy in test_gpu.py); every step's loss,
    and the final state, on the host."""
    xp = xp or StrictCupy()
    cfg = ModelConfig(widths=[784, 64, 32, 10], k=0.4, **variant)
    w, s = init_network(cfg, 0)
    net = Network(xp, cfg, w, s)
    t = TrainConfig(optimizer=optimizer, epochs=epochs, **(extra or {}))
    opt = optim.make(xp, net.params, t)
    step = make_step(net, opt, xp)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((88, 28, 28, 1)).astype(np.float32))
    y = xp.asarray(rng.integers(0, 10, 88))
    losses = []
    with step.stream:
        for epoch in range(epochs):
            step.set_k(enter_epoch(net, Config(model=cfg, train=t), epoch))
            perm = xp.asarray(np.random.default_rng([0, epoch]).permutation(88))
            for b in range(6):
                idx = perm[b * 16 : (b + 1) * 16]
                xb = data.augment(xp, x[idx], np.random.default_rng([epoch, b]), 2, True)
                l, c = step(xb, y[idx], 0.1 / (epoch + 1))
                losses.append((l.get().copy(), c.get().copy()))
    state = [p.get() for p in net.params] + [a.get() for a in net.norm_state()] + [net.w_flat.get()]
    state += [a.get() for arrays in opt.state.values() for a in arrays]
    if net.scores is not None:
        state.append(net.m_flat.get())
    return losses, state, opt.steps, step


def assert_same(a, b):
    (la, sa, na, _), (lb, sb, nb, _) = a, b
    assert na == nb
    for (l1, c1), (l2, c2) in zip(la, lb, strict=True):
        assert l1.tobytes() == l2.tobytes() and c1 == c2
    for p, q in zip(sa, sb, strict=True):
        assert p.dtype == q.dtype and p.tobytes() == q.tobytes()


@pytest.mark.parametrize("variant", list(REPLAYED))
def test_the_replayed_step_gives_the_bits_of_the_step_run_as_it_is(variant):
    # the CUDA kernels run on the executor (strict_cupy.RawModule); the residual nets' BatchNorm
    # and conv steps take the array code here, where the executor would cost seconds: their
    # kernels and graphs run whole in test_cuda_executor.py's resnet20 fit
    xp = lambda: StrictCupy(kernels="resnet" not in variant)  # noqa: E731
    eager = train(REPLAYED[variant], lambda net, opt, xp: EagerStep(net, opt), xp=xp())
    replayed = train(REPLAYED[variant], lambda net, opt, xp: CapturedStep(net, opt, xp), xp=xp())
    assert_same(eager, replayed)
    graphs = replayed[3].graphs
    if variant == "k warm-up":  # k changed after epoch 1: epoch 2 captured anew
        assert graphs[16, 28, 28, 1][0].launches == 4 and (8, 28, 28, 1) not in graphs
    else:  # the full batches': captured at batch 2 and launched at 2-5 and 7-11; the last batch's, at 12
        assert graphs[16, 28, 28, 1][0].launches == 9 and graphs[8, 28, 28, 1][0].launches == 1


def test_the_simulation_sees_host_state_a_graph_freezes():
    """Adam's bias corrections are host scalars of each step: replaying its captured step reuses
    the capture's, so CapturedStep must not (and does not, Adam.replayable) replay it."""
    eager = train({}, lambda net, opt, xp: EagerStep(net, opt), "adam")
    forced = train({}, lambda net, opt, xp: CapturedStep(net, opt, xp), "adam")
    assert eager[2] == forced[2]
    assert any(p.tobytes() != q.tobytes() for p, q in zip(eager[1], forced[1]))


def test_a_capture_that_fails_falls_back_to_the_step_as_it_is(capsys):
    """IteRand redraws from the host (a host-to-device copy, which a capture refuses) at its second
    step, the one captured: the step is run as it is instead, once, with a one-line note."""
    variant = dict(method="iterand", rerand_freq=2)
    eager = train(variant, lambda net, opt, xp: EagerStep(net, opt))
    fallen = train(variant, lambda net, opt, xp: CapturedStep(net, opt, xp))
    assert_same(eager, fallen)
    assert fallen[3].failed and not fallen[3].graphs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: the training step cannot be captured as a CUDA graph (CaptureError")


def test_the_stand_in_refuses_a_host_copy_while_capturing():
    xp = StrictCupy()
    stream = xp.cuda.Stream(non_blocking=True)
    stream.begin_capture()
    try:
        with pytest.raises(CaptureError):
            xp.asarray(np.ones(3, np.float32))
        a = xp.zeros(3, np.float32)  # device work is recorded
    finally:
        graph = stream.end_capture()
    assert len(graph.ops) == 1 and a.get().tolist() == [0, 0, 0]


def test_the_stand_in_replays_the_copies_of_asarray_and_ascontiguousarray():
    """NumPy does not dispatch asarray or ascontiguousarray to a device array's __array_function__:
    the stand-in records the copies they make (a compaction, a dtype change) so that a launch
    makes them again from the arrays' new contents; a view is no copy, and nothing to replay."""
    xp = StrictCupy(kernels=False)
    x = xp.zeros((4, 6), np.float32)
    stream = xp.cuda.Stream(non_blocking=True)
    stream.begin_capture()
    try:
        packed, wider, same = xp.ascontiguousarray(x[:, ::2]), xp.asarray(x, dtype=np.float64), xp.ascontiguousarray(x)
        doubled = packed * 2
    finally:
        graph = stream.end_capture()
    x[...] = xp.asarray(np.arange(24, dtype=np.float32).reshape(4, 6))
    graph.launch()
    assert doubled.get().tolist() == (2 * np.arange(24).reshape(4, 6)[:, ::2]).tolist()
    assert wider.dtype == np.float64 and wider.get().tolist() == np.arange(24).reshape(4, 6).tolist()
    assert np.shares_memory(same, x) and len(graph.ops) == 3  # (zeros outside: the two copies, the product)


@pytest.mark.parametrize("model, train_, replayed", [
    ({}, {}, True), ({}, dict(optimizer="adam"), False), (dict(method="supermask"), {}, False),
    (dict(method="iterand"), {}, False), ({}, dict(cuda_graph=False), False), (dict(method="dense"), {}, True)])
def test_the_step_is_replayed_where_the_method_and_optimizer_allow(model, train_, replayed):
    xp = StrictCupy()
    cfg = Config(model=ModelConfig(widths=[784, 32, 10], **model), train=TrainConfig(**train_))
    w, s = init_network(cfg.model, 0)
    net = Network(xp, cfg.model, w, s)
    opt = optim.make(xp, net.params, cfg.train)
    assert isinstance(stepper(cfg, Backend(xp, "gpu:0"), net, opt), CapturedStep) == replayed
    cpu = Network(np, cfg.model, w, s)
    assert isinstance(stepper(cfg, Backend(np, "cpu"), cpu, optim.make(np, cpu.params, cfg.train)), EagerStep)
