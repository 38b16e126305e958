"""NumPy and CuPy agree. Skipped (not failed) where CuPy or a CUDA device is missing."""

import numpy as np
import pytest

from scoretrain import optim
from scoretrain.backend import resolve
from scoretrain.config import ModelConfig, TrainConfig
from scoretrain.errors import DeviceError
from scoretrain.model import Network, init_network, topk_mask
from scoretrain.train import train_step

try:
    GPU = resolve("gpu")
except DeviceError as e:
    GPU = None
    WHY = str(e)

pytestmark = pytest.mark.skipif(GPU is None, reason="no CuPy with a CUDA device")


def stable_topk(a, k):
    order = np.argsort(-a.ravel(), kind="stable")
    mask = np.zeros(a.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(a.shape)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 777, 5000, 9999])
def test_gpu_topk_is_exact_on_random_and_tie_heavy_scores(k):
    cp = GPU.xp
    rng = np.random.default_rng(k)
    for a in (np.abs(rng.standard_normal(10000)).astype(np.float32), rng.integers(0, 7, 10000).astype(np.float32)):
        mask, _ = topk_mask(cp, cp.asarray(a), k)
        np.testing.assert_array_equal(cp.asnumpy(mask), stable_topk(a, k))


def nets(method, seed=0):
    cfg = ModelConfig(method=method, widths=[784, 256, 128, 10], k=0.4)
    w, s = init_network(cfg, seed)
    cpu = resolve("cpu")
    make = lambda b: Network(b.xp, cfg, w, s)  # noqa: E731
    return (cpu, make(cpu)), (GPU, make(GPU))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["edge-popup", "dense"])
def test_numpy_and_cupy_train_the_same_network(method):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64 * 5, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 64 * 5)
    results = []
    for backend, net in nets(method):
        xp = backend.xp
        opt = optim.make(xp, net.params, TrainConfig())
        w_eff0 = [backend.to_host(w) for w in net.effective_weights()]
        losses = []
        for i in range(5):
            l, _ = train_step(net, opt, xp.asarray(x[i * 64 : (i + 1) * 64]), xp.asarray(y[i * 64 : (i + 1) * 64]), 0.1)
            losses.append(float(l))
        net.effective_weights()
        masks = None if net.scores is None else [backend.to_host(m) for m in net.masks]
        results.append((w_eff0, losses, [backend.to_host(p) for p in net.params], masks))
    (w0_cpu, l_cpu, p_cpu, m_cpu), (w0_gpu, l_gpu, p_gpu, m_gpu) = results
    for a, b in zip(w0_cpu, w0_gpu):
        np.testing.assert_array_equal(a, b)  # same seed: the identical initial subnetwork
    np.testing.assert_allclose(l_cpu, l_gpu, rtol=1e-4)
    for a, b in zip(p_cpu, p_gpu):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    if m_cpu is not None:
        for a, b in zip(m_cpu, m_gpu):
            assert a.sum() == b.sum()
            assert (a != b).mean() < 1e-3  # only scores within rounding of the threshold may differ
