"""No host read inside the training loop, for every method, on the strict CuPy stand-in
(strict_cupy.py): CI has no GPU, and NumPy returns host scalars where CuPy returns 0-d device
arrays, so a plain NumPy run cannot see a read that would synchronize the GPU every step."""

import numpy as np
import pytest

from scoretrain.data import datasets as data
from scoretrain.nn import optim
from scoretrain.run.config import Config, ModelConfig, TrainConfig
from scoretrain.nn.model import Network, init_network
from scoretrain.run.step import train_step
from scoretrain.run.train import enter_epoch
from support.strict_cupy import DeviceArray, HostRead, StrictCupy

VARIANTS = {
    "edge-popup": {}, "biprop": dict(method="biprop"), "supermask": dict(method="supermask"), "dense": dict(method="dense"),
    "iterand": dict(method="iterand", rerand_freq=2), "global k": dict(k_scope="global"),
    "per filter": dict(score_granularity="filter"), "dense last": dict(dense_last=True),
    "conv": dict(arch="lenet", width=0.125),
    "resnet, BN": dict(arch="resnet20", width=0.25, bn="nonaffine"), "resnet, affine BN": dict(arch="resnet20", width=0.25, bn="affine"),
}


def test_the_stand_in_refuses_host_reads_and_keeps_0d_results_on_the_device():
    xp = StrictCupy()
    a = xp.asarray(np.arange(5, dtype=np.float32))
    for read in (lambda: bool(a.sum()), lambda: float(a.max()), lambda: int(a[2]), lambda: a.sum().item(),
                 lambda: [0, 1][a[1]], lambda: a.tolist(), lambda: bool(xp.count_nonzero(a))):
        with pytest.raises(HostRead):
            read()
    assert isinstance(a.sum(), DeviceArray) and a.sum().shape == () and isinstance(a[0], DeviceArray)
    assert a.sum().get() == 10


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_training_step_reads_nothing_back(variant, optimizer):
    """train.Loop.train_epoch's batch loop body (gather, augment, one step, accumulate the loss) raises no
    HostRead; the network's tensors stay device arrays."""
    xp = StrictCupy()
    cfg = ModelConfig(widths=[784, 64, 32, 10], k=0.4, **VARIANTS[variant])
    w, s = init_network(cfg, 0)
    net = Network(xp, cfg, w, s)
    opt = optim.make(xp, net.params, TrainConfig(optimizer=optimizer))
    enter_epoch(net, Config(model=cfg), 0)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((96, 28, 28, 1)).astype(np.float32))
    y = xp.asarray(rng.integers(0, 10, 96))
    perm = xp.asarray(rng.permutation(96))
    loss_sum, correct = xp.zeros((), xp.float64), xp.zeros((), xp.int64)
    for b in range(6):  # several: the later selections have a last threshold, iterand redraws
        idx = perm[b * 16 : (b + 1) * 16]
        l, c = train_step(net, opt, data.augment(xp, x[idx], np.random.default_rng(b), 2, True), y[idx], 0.1)
        loss_sum += l
        correct += c
    assert isinstance(loss_sum, DeviceArray) and all(isinstance(p, DeviceArray) for p in net.params)
    assert np.isfinite(loss_sum.get()) and opt.steps == 6
    net.effective_weights(train=False)  # the measuring masks: no read either (evaluate reads its totals once, at its end)
    assert isinstance(net.m_flat if net.scores is not None else net.w_flat, DeviceArray)
