"""NumPy and CuPy agree, and a CuPy training step never waits for the GPU. Skipped (not failed)
where CuPy or a CUDA device is missing. (tests/test_model.py runs the CuPy-only branches on
NumPy in CI; these run them on the device.)"""

import warnings

import numpy as np
import pytest

from scoretrain.data import datasets as data
from scoretrain.nn import optim
from scoretrain.kernels.backend import resolve
from scoretrain.run.config import ModelConfig, TrainConfig
from scoretrain.errors import DeviceError
from scoretrain.nn.methods import topk_mask
from scoretrain.nn.model import Network, init_network
from scoretrain.run.step import train_step

try:
    GPU, WHY = resolve("gpu"), ""
except DeviceError as e:
    GPU, WHY = None, str(e)

pytestmark = pytest.mark.skipif(GPU is None, reason=f"no CuPy with a CUDA device ({WHY})")


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


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["normal", "ties", "equal", "special"])
def test_the_cuda_radix_select_gives_its_cpu_models_masks_and_a_stable_sorts(kind):
    """kernels.cu's top-k kernels against radix_select.MODEL and a stable sort, every group
    size around a block's (tests/test_radix_select.py checks the model on the CPU)."""
    from test_radix_select import problem
    from test_radix_select import stable_topk as stable_topk_of_bits

    from scoretrain.kernels import loops as kernels
    from scoretrain.kernels.radix_select import MODEL, RadixTopK

    cp = GPU.xp
    groups, x, w, _ = problem(kind)
    kept = [max(1, (hi - lo) // 3) for lo, hi in groups]
    results = []
    for xp, k in ((np, MODEL), (cp, kernels.cuda(cp))):
        topk = RadixTopK(xp, groups, k)
        topk.set_kept(kept)
        mask, w_out = xp.zeros(x.size, bool), xp.zeros(x.size, np.float32)
        topk.select(xp.asarray(x), mask, xp.asarray(w), w_out)
        results.append((GPU.to_host(mask) if xp is cp else mask, GPU.to_host(w_out) if xp is cp else w_out,
                        GPU.to_host(topk.state) if xp is cp else topk.state))
    (m0, w0, s0), (m1, w1, s1) = results
    np.testing.assert_array_equal(m1, m0)
    np.testing.assert_array_equal(w1.view(np.uint32), w0.view(np.uint32))
    np.testing.assert_array_equal(s1, s0)
    for (lo, hi), k in zip(groups, kept):
        np.testing.assert_array_equal(m1[lo:hi], stable_topk_of_bits(x[lo:hi], k))  # NaN first, as the CPU ranks it


@pytest.mark.gpu
def test_gpu_topk_writes_into_a_view_and_reads_nothing_back():
    """Network passes views of one flat buffer (m_flat[lo:hi]) as `out`; the threshold stays a
    0-d device array (a host scalar would have cost a sync)."""
    cp = GPU.xp
    a = np.abs(np.random.default_rng(0).standard_normal(5000)).astype(np.float32)
    buf = cp.zeros(6000, dtype=bool)
    mask, t = topk_mask(cp, cp.asarray(a), 1234, out=buf[500:5500])
    assert isinstance(t, cp.ndarray) and t.ndim == 0
    host = cp.asnumpy(buf)
    np.testing.assert_array_equal(host[500:5500], stable_topk(a, 1234))
    np.testing.assert_array_equal(cp.asnumpy(mask), host[500:5500])
    assert not host[:500].any() and not host[5500:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("opt", [dict(optimizer="sgd"), dict(optimizer="sgd", nesterov=True), dict(optimizer="sgd", momentum=0.0),
                                 dict(optimizer="adam"), dict(optimizer="adam", weight_decay=0.0)])
def test_cuda_optimizer_kernels_give_the_bits_of_the_cpu_loops(opt):
    """kernels.CUDA round after every operation, as the numba loops and the array code do."""
    cp = GPU.xp
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(1000).astype(np.float32), rng.standard_normal((7, 9)).astype(np.float32)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in p0] for _ in range(4)]
    finals = []
    for xp, to_host in ((np, np.asarray), (cp, cp.asnumpy)):
        params = [xp.asarray(p.copy()) for p in p0]
        o = optim.make(xp, params, TrainConfig(**opt))
        for step, gs in enumerate(grads):
            o.step(params, [xp.asarray(g.copy()) for g in gs], 0.1 / (step + 1))
        finals.append([to_host(a) for a in params + [a for arrays in o.state.values() for a in arrays]])
    for a, b in zip(*finals):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.gpu
def test_cuda_straight_through_kernel_gives_the_bits_of_the_cpu_loop():
    from scoretrain.nn.methods import straight_through

    cp = GPU.xp
    rng = np.random.default_rng(0)
    g, w, s = (rng.standard_normal(100_003).astype(np.float32) for _ in range(3))
    s[:4] = [0.0, -0.0, np.inf, -np.inf]
    g_cpu, g_gpu = g.copy(), cp.asarray(g)
    straight_through(np, g_cpu, w, s, np.empty_like(g))
    straight_through(cp, g_gpu, cp.asarray(w), cp.asarray(s), cp.empty_like(g_gpu))
    np.testing.assert_array_equal(cp.asnumpy(g_gpu).view(np.uint32), g_cpu.view(np.uint32))


@pytest.mark.gpu
def test_cuda_relu_and_col2im_kernels_give_the_bits_of_the_cpu():
    from scoretrain.nn.layers import Conv2d, ReLU

    cp = GPU.xp
    rng = np.random.default_rng(1)
    y = np.maximum(rng.standard_normal((128, 300)).astype(np.float32), 0)
    d = rng.standard_normal((128, 300)).astype(np.float32)
    got = ReLU(cp).backward(cp.asarray(d), cp.asarray(y), [], [], True)
    np.testing.assert_array_equal(cp.asnumpy(got).view(np.uint32), (d * (y > 0)).view(np.uint32))
    for k, stride, pad in ((3, 1, 1), (3, 2, 1), (1, 2, 0), (5, 2, 2)):
        x = rng.standard_normal((8, 11, 10, 3)).astype(np.float32)
        w = rng.standard_normal((4, k, k, 3)).astype(np.float32)
        shape, _ = Conv2d(np, 3, 4, k, stride, pad).output_shape((11, 10, 3))
        g = rng.standard_normal((8, *shape)).astype(np.float32)
        dxs = []
        for xp in (np, cp):
            conv = Conv2d(xp, 3, 4, k, stride, pad)
            conv.index = 0
            _, cache = conv.forward(xp.asarray(x), [xp.asarray(w)], True)
            dxs.append(conv.backward(xp.asarray(g), cache, [xp.asarray(w)], [xp.empty(w.shape, np.float32)], True))
        np.testing.assert_array_equal(cp.asnumpy(dxs[1]), dxs[0])  # the sums in one order: the same bits


@pytest.mark.gpu
@pytest.mark.parametrize("n, c", [(128, 10), (1000, 10), (37, 100)])
def test_cuda_cross_entropy_kernel_matches_the_array_code_and_repeats(n, c):
    from scoretrain.nn.model import cross_entropy

    cp = GPU.xp
    rng = np.random.default_rng(n)
    logits = (rng.standard_normal((n, c)) * 4).astype(np.float32)
    y = rng.integers(0, c, n)
    logits[0, y[0]] = logits[0].max() + 1  # a correct one for sure
    loss, correct, d = cross_entropy(np, logits.copy(), y)
    gl, gc, gd = cross_entropy(cp, cp.asarray(logits), cp.asarray(y))
    assert int(gc) == int(correct)
    assert float(gl) == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(cp.asnumpy(gd), d, rtol=1e-5, atol=1e-8)
    again = cross_entropy(cp, cp.asarray(logits), cp.asarray(y))
    assert float(again[0]) == float(gl) and cp.array_equal(again[2], gd)  # no atomics: the same bits every time
    ml, mc, none = cross_entropy(cp, cp.asarray(logits), cp.asarray(y), grad=False)
    assert none is None and float(ml) == float(gl) and int(mc) == int(gc)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["edge-popup", "biprop", "conv", "resnet, BN"])
def test_the_cuda_graph_replay_gives_the_bits_of_the_step_run_as_it_is(variant):
    """step.CapturedStep on a real GPU, as tests/test_graph.py checks it on the simulation."""
    from scoretrain.run.step import CapturedStep, EagerStep
    from test_graph import REPLAYED, assert_same, train

    eager = train(REPLAYED[variant], lambda net, opt, xp: EagerStep(net, opt), xp=GPU.xp)
    replayed = train(REPLAYED[variant], lambda net, opt, xp: CapturedStep(net, opt, xp), xp=GPU.xp)
    assert not replayed[3].failed and len(replayed[3].graphs) == 2  # captured (both shapes), not fallen back
    assert_same(eager, replayed)


# Networks of every kind the layers make: MLP (per-layer and global top-k), conv nets (im2col as a
# strided view, max pool on strided corners) on CIFAR- and MNIST-shaped images.
KINDS = {
    "mlp": ((28, 28, 1), dict(widths=[784, 256, 128, 10])),
    "mlp-global": ((28, 28, 1), dict(widths=[784, 256, 128, 10], k_scope="global")),
    "conv2": ((32, 32, 3), dict(arch="conv2", width=0.125)),
    "lenet-global": ((28, 28, 1), dict(arch="lenet", width=0.25, k_scope="global")),
    # residual blocks (strided and 1x1 convs, global average pooling) with BatchNorm of both kinds
    "resnet20-bn": ((28, 28, 1), dict(arch="resnet20", width=0.25, bn="nonaffine")),
    "resnet20-affine": ((32, 32, 3), dict(arch="resnet20", width=0.25, bn="affine")),
}


def nets(method, kind="mlp", seed=0):
    image, model = KINDS[kind]
    cfg = ModelConfig(method=method, k=0.4, **model)
    w, s = init_network(cfg, seed, image)
    cpu = resolve("cpu")
    make = lambda b: Network(b.xp, cfg, w, s, image)  # noqa: E731
    return (cpu, make(cpu)), (GPU, make(GPU))


def batches(kind, n, size, seed=0):
    rng = np.random.default_rng(seed)
    image = KINDS[kind][0]
    return [(rng.standard_normal((size, *image)).astype(np.float32), rng.integers(0, 10, size)) for _ in range(n)]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["edge-popup", "biprop", "dense"])  # supermask: see below (its samples are backend-specific)
@pytest.mark.parametrize("kind", list(KINDS))
def test_numpy_and_cupy_train_the_same_network(method, kind):
    conv = not kind.startswith("mlp")
    data_ = batches(kind, 5, 32 if conv else 64)
    lr = 0.003 if conv and method == "dense" else 0.1  # dense conv nets blow up at 0.1 on noise
    results = []
    for backend, net in nets(method, kind):
        xp = backend.xp
        opt = optim.make(xp, net.params, TrainConfig())
        w_eff0 = [backend.to_host(w) for w in net.effective_weights()]
        losses = [float(train_step(net, opt, xp.asarray(x), xp.asarray(y), lr)[0]) for x, y in data_]
        net.effective_weights()
        masks = None if net.scores is None else [backend.to_host(m) for m in net.masks]
        results.append((w_eff0, losses, [backend.to_host(p) for p in net.params], masks))
    (w0_cpu, l_cpu, p_cpu, m_cpu), (w0_gpu, l_gpu, p_gpu, m_gpu) = results
    for a, b in zip(w0_cpu, w0_gpu):
        if method == "biprop":  # alpha is a float32 sum: summation order differs between the backends
            np.testing.assert_allclose(a, b, rtol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)  # same seed: the identical initial subnetwork
    np.testing.assert_allclose(l_cpu, l_gpu, rtol=1e-3 if conv else 1e-4)
    for a, b in zip(p_cpu, p_gpu):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 if conv else 1e-5)
    if m_cpu is not None:
        # exactly k per group; only scores within rounding of the threshold may land differently
        if "global" not in kind:
            assert [int(a.sum()) for a in m_cpu] == [int(b.sum()) for b in m_gpu]
        assert sum(int(a.sum()) for a in m_cpu) == sum(int(b.sum()) for b in m_gpu)
        flips = sum(int((a != b).sum()) for a, b in zip(m_cpu, m_gpu))
        assert flips / sum(a.size for a in m_cpu) < (5e-3 if conv else 1e-3)


@pytest.mark.gpu
def test_supermask_on_cupy_samples_by_sigmoid_and_repeats_per_seed_and_epoch():
    """CuPy's generator (XORWOW) is not NumPy's: supermask samples differ between the backends, so
    on the GPU check what resuming needs instead: the same (seed, epoch), the same samples."""
    (cpu, net_c), (gpu, net) = nets("supermask")
    sample = lambda train: [gpu.to_host(m) for m in (net.effective_weights(train) and net.masks)]  # noqa: E731
    net.reseed(3, 1)
    a, b = sample(True), sample(True)
    assert any(not np.array_equal(x, z) for x, z in zip(a, b))  # a fresh sample per step
    p = np.concatenate([1 / (1 + np.exp(-gpu.to_host(s).astype(np.float64))).ravel() for s in net.scores])
    assert abs(np.concatenate([m.ravel() for m in a]).mean() - p.mean()) < 0.01  # M ~ Bernoulli(sigmoid(S))
    m1, m2 = sample(False), sample(False)
    for x, z in zip(m1, m2):
        np.testing.assert_array_equal(x, z)  # measuring: one fixed sample per (seed, epoch)
    net.reseed(3, 1)
    for x, z in zip(a, sample(True)):
        np.testing.assert_array_equal(x, z)  # reseeded: the same samples again
    opt = optim.make(gpu.xp, net.params, TrainConfig())
    for x, y in batches("mlp", 3, 64):
        train_step(net, opt, gpu.xp.asarray(x), gpu.xp.asarray(y), 0.1)
    assert all(bool(gpu.xp.isfinite(s).all()) for s in net.params)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["edge-popup", "biprop", "supermask"])
def test_stored_host_masks_give_the_same_subnetwork_on_both_backends(method):
    """`scoretrain eval` and resuming hand a run's stored (host) masks to Network.subnetwork."""
    (cpu, net_c), (gpu, net_g) = nets(method)
    masks = [cpu.to_host(m) for m in (net_c.effective_weights(train=False) and net_c.masks)]
    masks[0] = ~masks[0]  # not the scores' own mask: it must be taken as given
    for a, b in zip(net_c.subnetwork(masks), net_g.subnetwork(masks)):
        np.testing.assert_allclose(cpu.to_host(a), gpu.to_host(b), rtol=1e-6)  # biprop: alpha's float32 sums
    for m, b in zip(masks, net_g.masks):
        np.testing.assert_array_equal(gpu.to_host(b), m)


# --- no host-device synchronization inside the batch loop ---------------------------------------

METHODS = ["edge-popup", "biprop", "supermask", "dense"]
# CuPy's partition with a large kth sorts the whole array with Thrust, whose sort ends in a
# cudaStreamSynchronize (cupy/cupy#9126; CuPy >= 14 passes par_nosync, cupy/cupy#9497, but Thrust
# may still synchronize inside sort, NVIDIA/cccl#2397). The top-k methods are expected to fail the
# complete check below until the selection avoids sort; the CuPy-visible check holds for all.
SORT_SYNC = pytest.mark.xfail(reason="cupy.partition -> Thrust sort synchronizes the stream", strict=False)


def loop_body(method, n_batches, batch=64):
    """train.Loop.train_epoch's batch loop body (gather a batch, augment it, one step, accumulate the loss),
    on the GPU, as a function of the batch number."""
    cp = GPU.xp
    cfg = ModelConfig(method=method, widths=[784, 256, 128, 10], k=0.4)
    w, s = init_network(cfg, 0)
    net = Network(cp, cfg, w, s)
    net.reseed(0, 0)
    opt = optim.make(cp, net.params, TrainConfig())
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((n_batches * batch, 28, 28, 1)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, n_batches * batch))
    perm = cp.asarray(rng.permutation(n_batches * batch))
    aug_rng = np.random.default_rng(1)
    loss_sum, correct = cp.zeros((), cp.float64), cp.zeros((), cp.int64)

    def body(b):
        nonlocal loss_sum, correct
        idx = perm[b * batch : (b + 1) * batch]
        l, c = train_step(net, opt, data.augment(cp, x[idx], aug_rng, 2, True), y[idx], 0.1)
        loss_sum += l
        correct += c

    return body


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_a_training_step_reads_nothing_back_that_cupy_can_see(method):
    """With cupyx.allow_synchronize(False), CuPy raises DeviceSynchronized at any read it performs
    (ndarray.get, float(), int(), bool(), .item(), Stream.synchronize): a Python `if` on a device
    value in the step fails here, at its line."""
    cupyx = pytest.importorskip("cupyx")
    if not hasattr(cupyx, "allow_synchronize"):  # deprecated since CuPy v10, may be removed
        pytest.skip("this CuPy has no cupyx.allow_synchronize")
    body = loop_body(method, 4)
    body(0)  # first calls: kernel compilation, memory pools
    GPU.sync()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # allow_synchronize warns that it is deprecated
        with cupyx.allow_synchronize(False):
            for b in range(1, 4):
                body(b)
    GPU.sync()


SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


@pytest.mark.gpu
@pytest.mark.parametrize("method", [pytest.param(m, marks=SORT_SYNC) if m in ("edge-popup", "biprop") else m for m in METHODS])
def test_a_training_step_never_waits_for_the_gpu(method):
    """Any synchronization (CuPy's, Thrust's, the driver's) makes the host wait for all work queued
    before it. Queue a kernel that keeps the GPU busy for about a second, then two batches: if
    the host got through them while that kernel is still running, nothing in them waited."""
    cp = GPU.xp
    body = loop_body(method, 4)
    body(0)  # first calls: kernel compilation, memory pools (device and pinned)
    body(1)
    spin = cp.RawKernel(SPIN, "spin")
    spin((1,), (1,), (np.int64(10**6),))  # compile it, outside the timed part
    GPU.sync()
    stream = cp.cuda.get_current_stream()
    spin((1,), (1,), (np.int64(2 * 10**9),))  # ~1 s at 2 GHz
    busy = cp.cuda.Event()
    busy.record(stream)
    for b in range(2, 4):
        body(b)
    still_busy = not busy.done
    GPU.sync()
    assert still_busy, "the host waited for the GPU inside the batch loop"
