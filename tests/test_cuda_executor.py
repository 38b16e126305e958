"""kernels.cu executed on the CPU (cuda_executor.py), through CuPy's calling convention: each
kernel against its oracle (the numba loop, radix_select's NumPy model and a stable sort, the
array code) on random shapes and the hard cases, under AddressSanitizer and UBSan, with the
threads of a block in seeded orders and garbage in shared memory; then whole `fit`s on the
strict CuPy stand-in with every CUDA kernel running, against the NumPy path.

Exact kernels give the oracle's bits, and the same bits for every executor seed (a race or a
read of unwritten shared memory would make them depend on it). cross_entropy is not exact: it
calls expf/logf (the CPU's libm here, CUDA's on a GPU: neither is NumPy's) and sums in its own
order; its bound is stated in its test."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from support import cuda_executor
from scoretrain import cli
from scoretrain.kernels import loops as kernels
from scoretrain.nn import optim
from scoretrain.run import store
from scoretrain.kernels.backend import Backend
from scoretrain.run.config import TrainConfig
from scoretrain.kernels.radix_select import CHUNK, MODEL, RadixTopK
from support.strict_cupy import Graph, StrictCupy, allowing_reads
from test_radix_select import problem, scores, stable_topk

pytestmark = pytest.mark.skipif(shutil.which(cuda_executor.CXX) is None, reason="no C++ compiler (g++) for the CUDA executor")

SEEDS = (0, 1)  # executor seeds: thread and block orders, shared-memory garbage
SIZES = [0, 1, 255, 256, 257, 4097, 100_003]  # around a block of 256, and many blocks
WRAP = 8192 * 256 + 1001  # past the grid's 8,192-block cap: the grid-stride loops go round again
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -1.0], np.float32)


def device(seed=0):
    xp = StrictCupy(seed=seed)
    return xp, kernels.cuda(xp)


def values(n, rng, special=True):
    """Normal floats (none subnormal), the special values among them."""
    x = rng.standard_normal(n).astype(np.float32)
    if special and n:
        x[rng.choice(n, min(n, len(SPECIAL)), replace=False)] = SPECIAL[: min(n, len(SPECIAL))]
    return x


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


# --- each kernel against its oracle --------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES + [WRAP])
def test_straight_through_and_relu_backward_give_the_numba_loops_bits(n):
    rng = np.random.default_rng(n)
    g, w, s = values(n, rng), values(n, rng), values(n, rng)
    want = g.copy()
    kernels.straight_through(want, w, s)
    y = values(n, rng)
    relu = np.empty_like(g)
    kernels.relu_backward(g, y, relu)
    for seed in SEEDS if n < WRAP else SEEDS[:1]:
        xp, k = device(seed)
        got = xp.asarray(g)
        k.straight_through(got, xp.asarray(w), xp.asarray(s))
        same_bits(got.get(), want)
        out = xp.zeros(n, np.float32)
        k.relu_backward(xp.asarray(g), xp.asarray(y), out)
        same_bits(out.get(), relu)


OPTIMIZERS = [dict(optimizer="sgd"), dict(optimizer="sgd", nesterov=True), dict(optimizer="sgd", momentum=0.0),
              dict(optimizer="sgd", weight_decay=0.0), dict(optimizer="adam"), dict(optimizer="adam", weight_decay=0.0)]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_the_optimizer_kernels_give_the_cpu_loops_bits(opt):
    """optim's steps on both backends, 3 steps at changing learning rates (the SGD kernel reads
    its rate from the device: a host number goes through its buffer), over tensors of every size."""
    rng = np.random.default_rng(0)
    p0 = [values(n, rng, special=False) for n in (1, 257, 4097, 100_003)]
    grads = [[values(p.size, rng) for p in p0] for _ in range(3)]
    finals = []
    for xp in (np, StrictCupy(seed=1)):
        params = [xp.asarray(p.copy()) for p in p0]
        o = optim.make(xp, params, TrainConfig(**opt))
        for step, gs in enumerate(grads):
            o.step(params, [xp.asarray(g.copy()) for g in gs], 0.1 / (step + 1))
        host = (lambda a: a) if xp is np else (lambda a: a.get())
        finals.append([host(a) for a in params + [a for arrays in o.state.values() for a in arrays]])
    for a, b in zip(*finals, strict=True):
        same_bits(b, a)  # nan and inf where the gradients had them, in the same places


@pytest.mark.parametrize("kind", ["normal", "ties", "equal", "special"])
def test_the_radix_select_kernels_give_the_models_masks_and_a_stable_sorts(kind):
    """Groups of every size around a block's CHUNK (one block, several), k = n, n - 1 and
    fractions; the scores' bits with ties, signed zeros, NaN, inf and subnormals."""
    groups, x, w, _ = problem(kind)
    results = {}
    for fractions in ([1.0] * len(groups), [0.01, 0.3, 0.7, 0.999, 0.1, 0.6]):
        kept = [max(1, min(hi - lo, round(f * (hi - lo)))) for f, (lo, hi) in zip(fractions, groups)]
        kept[-1] = max(1, kept[-1] - 1)
        for name, xp, k in [("model", np, MODEL)] + [(f"seed {s}", *device(s)) for s in SEEDS]:
            topk = RadixTopK(xp, groups, k)
            topk.set_kept(kept)
            mask, w_out = xp.zeros(x.size, bool), xp.full(x.size, 7.0, np.float32)
            topk.select(xp.asarray(x), mask, xp.asarray(w), w_out)
            host = (lambda a: a) if xp is np else (lambda a: a.get())
            results[name] = [host(mask), host(w_out), host(topk.state)]
        for name in results:
            for a, b in zip(results[name], results["model"]):
                same_bits(a, b)
        mask, w_out, _ = results["seed 0"]
        for (lo, hi), k in zip(groups, kept):
            np.testing.assert_array_equal(mask[lo:hi], stable_topk(x[lo:hi], k))
        same_bits(w_out, w * mask)


@pytest.mark.parametrize("sizes, kept", [([0, 1, 5], [0, 1, 0]), ([3 * CHUNK + 1, 1], [3 * CHUNK + 1, 1]),
                                         ([CHUNK + 1, 2 * CHUNK], [0, 2 * CHUNK - 1])])
def test_the_radix_select_at_empty_groups_k_0_and_k_n(sizes, kept):
    """A group of no elements (one block of nothing), of one, k = 0 and k = n, without w."""
    rng = np.random.default_rng(len(sizes))
    groups, at = [], 0
    for n in sizes:
        groups.append((at, at + n))
        at += n
    x = scores("ties", at, rng)
    xp, k = device()
    topk = RadixTopK(xp, groups, k)
    topk.set_kept(kept)
    mask = xp.zeros(at, bool)
    topk.select(xp.asarray(x), mask)
    mask = mask.get()
    for (lo, hi), n in zip(groups, kept):
        np.testing.assert_array_equal(mask[lo:hi], stable_topk(x[lo:hi], n))


@pytest.mark.parametrize("k, stride, pad, shape", [(3, 1, 1, (4, 9, 10, 3)), (3, 2, 1, (3, 11, 10, 5)), (1, 2, 0, (2, 9, 9, 4)),
                                                    (5, 2, 2, (2, 12, 11, 3)), (3, 3, 0, (1, 10, 10, 2)),
                                                    (1, 1, 0, (8, 64, 64, 66))])  # the last: dx past the grid's cap
def test_col2im_gives_the_numba_loops_bits(k, stride, pad, shape):
    rng = np.random.default_rng(k * 10 + stride)
    n, h, w, c = shape
    hp, wp = h + 2 * pad, w + 2 * pad
    ho, wo = (hp - k) // stride + 1, (wp - k) // stride + 1
    dcols = values(n * ho * wo * k * k * c, rng).reshape(n, ho, wo, k, k, c)
    want = np.full((n, h, w, c), np.float32(np.nan))  # every element is written
    kernels.col2im(dcols, stride, pad, want)
    for seed in SEEDS if want.size < WRAP else SEEDS[:1]:
        xp, kk = device(seed)
        got = xp.full(want.shape, np.float32(np.nan))
        kk.col2im(xp.asarray(dcols), stride, pad, got)
        same_bits(got.get(), want)


@pytest.mark.parametrize("n, c", [(1, 10), (128, 10), (300, 10), (37, 100), (256, 1)])
def test_cross_entropy_is_within_its_bound_of_the_array_code_and_the_same_for_every_seed(n, c):
    """Within 1e-6 of the loss (relative) and 1e-6 of dL/dlogits (relative to its largest
    element): expf/logf's last bits and the order of the sums; the number correct exactly."""
    from scoretrain.nn.model import cross_entropy

    rng = np.random.default_rng(n + c)
    logits = (rng.standard_normal((n, c)) * 4).astype(np.float32)
    y = rng.integers(0, c, n)
    logits[0, y[0]] = logits[0].max() + 1
    if n > 2:
        logits[1, :2] = logits[1].max() + 1  # a tie for the argmax: the first one counts
    loss, correct, d = cross_entropy(np, logits, y)
    got = []
    for seed in SEEDS:
        xp = StrictCupy(seed=seed)
        gl, gc, gd = cross_entropy(xp, xp.asarray(logits), xp.asarray(y))
        ml, mc, none = cross_entropy(xp, xp.asarray(logits), xp.asarray(y), grad=False)
        assert none is None and ml.get() == gl.get() and mc.get() == gc.get()
        got.append((gl.get(), gc.get(), gd.get()))
    assert int(got[0][1]) == int(correct)
    assert abs(float(got[0][0]) - float(loss)) <= 1e-6 * abs(float(loss))
    assert np.abs(got[0][2] - d).max() <= 1e-6 * np.abs(d).max()
    for a, b in zip(got[0], got[1]):
        same_bits(a, b)  # a fixed tree: no atomics, the same bits whatever the order of the threads


def test_subnormals_flush_to_zero_as_on_a_gpu():
    """CuPy compiles with -ftz=true: a subnormal operand or result is 0 on the GPU, where the CPU's
    NumPy keeps it. The one place an exact kernel's bits may differ from the CPU's."""
    xp, k = device()
    g = np.array([1e-39, -1e-39, 1e-20, 3.0], np.float32)
    w = np.array([1.0, 1.0, 1e-20, 2.0], np.float32)
    s = np.ones(4, np.float32)
    got = xp.asarray(g)
    k.straight_through(got, xp.asarray(w), xp.asarray(s))
    same_bits(got.get(), np.array([0.0, -0.0, 0.0, 6.0], np.float32))  # 1e-20 * 1e-20 = 1e-40 flushed too
    cpu = g.copy()
    kernels.straight_through(cpu, w, s)
    assert cpu[0] == np.float32(1e-39)


def test_every_kernel_was_launched_with_what_it_declares():
    """Each launch above went through the packing checks; here each kernel is called through
    kernels.cuda() once and its parameters checked against kernels.cu's declarations."""
    xp, k = device()
    declared = cuda_executor.parse_kernels(kernels.CUDA_SOURCE.read_text())
    assert set(declared) == set(kernels.CUDA_KERNELS)
    launched = []
    original = cuda_executor.Launch.__call__

    def spy(self):
        launched.append(self.name)
        return original(self)

    cuda_executor.Launch.__call__ = spy
    try:
        f = xp.asarray(values(5000, np.random.default_rng(0), special=False))
        k.straight_through(f, f, f)
        k.update("sgd", f, f, (xp.zeros(5000, np.float32),), (0.1, np.float32(0.9), np.float32(5e-4), True))
        k.update("adam", f, f, (xp.zeros(5000, np.float32), xp.zeros(5000, np.float32)), tuple(np.float32(v) for v in range(1, 9)))
        topk = RadixTopK(xp, [(0, 3000), (3000, 5000)], k)
        topk.set_kept([100, 2000])
        topk.select(f, xp.zeros(5000, bool), f, xp.zeros(5000, np.float32))
        k.relu_backward(f, f, xp.zeros(5000, np.float32))
        k.col2im(xp.zeros((2, 3, 3, 3, 3, 2), np.float32), 2, 1, xp.zeros((2, 5, 5, 2), np.float32))
        logits = xp.zeros((8, 10), np.float32)
        k.cross_entropy(logits, xp.zeros(8, np.int64), xp.zeros((8, 10), np.float32), xp.zeros((), np.float32), xp.zeros((), np.int64))
    finally:
        cuda_executor.Launch.__call__ = original
    assert set(launched) == set(kernels.CUDA_KERNELS)


# --- CuPy's calling convention ----------------------------------------------------------------------

PROBE = r"""
extern "C" __global__ void probe(const float* x, float* out, float a, double b, long long c, int d, bool e, unsigned int f) {
    out[0] = x[0] + a; out[1] = (float)b; out[2] = (float)c; out[3] = (float)d; out[4] = e ? 1.0f : 0.0f; out[5] = (float)f;
}
"""


def test_arguments_are_packed_as_cupy_packs_them():
    xp = StrictCupy()
    f = xp.RawModule(code=PROBE).get_function("probe")
    x, out = xp.asarray(np.array([1.5], np.float32)), xp.zeros(6, np.float32)
    f((1,), (1,), (x, out, np.float32(2), 3.0, 4, np.int32(5), np.bool_(True), np.uint32(6)))  # a float: double, an int: long long
    np.testing.assert_array_equal(out.get(), [3.5, 3, 4, 5, 1, 6])
    bad = {  # each: the argument list with one mistake, and what the error names
        "a host array": ((np.zeros(1, np.float32), out, np.float32(2), 3.0, 4, np.int32(5), np.bool_(True), np.uint32(6)), "host array"),
        "a Python float for float": ((x, out, 2.0, 3.0, 4, np.int32(5), np.bool_(True), np.uint32(6)), "argument 2 (float a): 4 bytes, but CuPy packs float64 as 8"),
        "a Python int for int": ((x, out, np.float32(2), 3.0, 4, 5, np.bool_(True), np.uint32(6)), "argument 5 (int d): 4 bytes, but CuPy packs int64 as 8"),
        "a Python bool for bool": ((x, out, np.float32(2), 3.0, 4, np.int32(5), True, np.uint32(6)), "argument 6 (bool e): 1 bytes, but CuPy packs int64"),
        "an int32 for float": ((x, out, np.int32(2), 3.0, 4, np.int32(5), np.bool_(True), np.uint32(6)), "argument 2 (float a): a float, given int32"),
        "a float64 array": ((xp.zeros(1), out, np.float32(2), 3.0, 4, np.int32(5), np.bool_(True), np.uint32(6)), "float64 (8 bytes)"),
        "a scalar for a pointer": ((np.int64(0), out, np.float32(2), 3.0, 4, np.int32(5), np.bool_(True), np.uint32(6)), "a pointer, given a int64"),
        "too few": ((x, out), "takes 8 arguments"),
        "a string": ((x, out, "2", 3.0, 4, np.int32(5), np.bool_(True), np.uint32(6)), "Unsupported type"),
        "a strided array": ((x, xp.zeros(12, np.float32)[::2], np.float32(2), 3.0, 4, np.int32(5), np.bool_(True), np.uint32(6)), "non-contiguous"),
    }
    for what, (args, message) in bad.items():
        with pytest.raises(cuda_executor.LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
            f((1,), (1,), args)
    with pytest.raises(cuda_executor.LaunchError, match="more than 1024 threads"):
        f((1,), (32, 33), (x, out, np.float32(2), 3.0, 4, np.int32(5), np.bool_(True), np.uint32(6)))
    with pytest.raises(cuda_executor.LaunchError, match="must be a tuple"):
        f([1], (1,), (x, out, np.float32(2), 3.0, 4, np.int32(5), np.bool_(True), np.uint32(6)))


# --- faults a GPU would show as wrong results or crashes ------------------------------------------

FAULTY = r"""
extern "C" {
__global__ void past_the_end(const float* x, float* out, int n) {  // reads x[n]
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i < n ? i : 0] += x[i];
}
__global__ void shared_overrun(float* out) {
    __shared__ float tile[32];
    tile[threadIdx.x] = 1.0f;  // 33 threads
    __syncthreads();
    out[threadIdx.x] = tile[threadIdx.x];
}
__global__ void unwritten_shared(float* out) {
    __shared__ float tile[64];
    if (threadIdx.x < 32) tile[threadIdx.x] = 1.0f;  // tile[32..63] never written
    __syncthreads();
    out[threadIdx.x] = tile[threadIdx.x];
}
__global__ void missing_barrier(int* out) {
    __shared__ int value[256];
    value[threadIdx.x] = threadIdx.x;
    out[threadIdx.x] = value[255 - threadIdx.x];  // another thread's, with no __syncthreads between
}
__global__ void shift_overflow(unsigned int* out, int shift) { out[0] = 1u << shift; }
}
"""


def test_an_access_past_an_array_or_a_shared_tile_is_an_error_naming_the_kernel():
    xp = StrictCupy()
    m = xp.RawModule(code=FAULTY)
    with pytest.raises(cuda_executor.KernelFault, match=r"kernel past_the_end .*heap-buffer-overflow"):
        m.get_function("past_the_end")((1,), (64,), (xp.zeros(10, np.float32), xp.zeros(10, np.float32), np.int32(10)))
    with pytest.raises(cuda_executor.KernelFault, match=r"kernel shared_overrun .*(global-buffer-overflow|out of bounds)"):
        m.get_function("shared_overrun")((1,), (33,), (xp.zeros(33, np.float32),))
    with pytest.raises(cuda_executor.KernelFault, match=r"kernel shift_overflow .*shift exponent 32"):
        m.get_function("shift_overflow")((1,), (1,), (xp.zeros(1, np.uint32), np.int32(32)))
    out = xp.zeros(64, np.float32)  # the executor runs on after a fault
    m.get_function("unwritten_shared")((1,), (64,), (out,))
    assert (out.get()[:32] == 1).all()


def test_unwritten_shared_memory_and_a_missing_barrier_change_the_result_with_the_seed():
    results = {"unwritten_shared": set(), "missing_barrier": set()}
    for seed in range(3):
        xp = StrictCupy(seed=seed)
        m = xp.RawModule(code=FAULTY)
        out = xp.zeros(64, np.float32)
        m.get_function("unwritten_shared")((1,), (64,), (out,))
        assert (out.get()[:32] == 1).all() and (out.get()[32:] != 1).any()  # garbage, not zeros
        results["unwritten_shared"].add(out.get().tobytes())
        race = xp.zeros(256, np.int32)
        m.get_function("missing_barrier")((1,), (256,), (race,))
        assert not np.array_equal(race.get(), np.arange(255, -1, -1))  # some threads read before the write
        results["missing_barrier"].add(race.get().tobytes())
    assert all(len(r) == 3 for r in results.values())


# --- whole fits: every CUDA kernel, graphs captured and replayed ------------------------------------

FITS = {
    "mnist_fc": ["configs/mnist_fc.yaml", "model.widths=[784,64,10]", "data.train_samples=1000", "train.batch_size=100"],
    "lenet": ["configs/mnist_lenet.yaml", "model.width=0.25", "data.train_samples=256", "train.batch_size=64"],
    "resnet20": ["configs/mnist_resnet20.yaml", "model.width=0.125", "data.train_samples=128", "train.batch_size=64",
                 "train.bn_recalibration=64"],
}
COMMON = ["train.epochs=2", "data.test_samples=200", "train.eval_batch_size=100", "train.conv_engine=im2col"]  # the kernels against im2col


def fit(tmp_path, name, args, monkeypatch=None, exact_loss=False):
    """`scoretrain fit` through the CLI; on the GPU, the stand-in with the executor as CuPy. With
    exact_loss the GPU side computes the loss with the array code (int32 labels: not the kernel's)."""
    if monkeypatch is not None:
        from scoretrain.nn import model
        from scoretrain.run import lifecycle, step

        xp = StrictCupy()
        monkeypatch.setattr(lifecycle, "resolve", lambda device: Backend(xp, "gpu:0"))  # where fit resolves its device
        if exact_loss:
            monkeypatch.setattr(step, "cross_entropy", lambda xp, logits, y, grad=True: model.cross_entropy(xp, logits, y.astype(np.int32), grad))
    with allowing_reads():
        result = CliRunner().invoke(cli.app, ["fit", *args, "--runs-dir", str(tmp_path), "--name", name, "-q"])
    assert result.exit_code == 0, result.output
    return store.load(tmp_path / name, with_optimizer=True)


@pytest.mark.parametrize("net", list(FITS))
def test_a_fit_on_the_executor_gives_the_numpy_paths_bits_but_for_the_loss_kernel(net, tmp_path, monkeypatch):
    """Every step but cross_entropy is exact, so with the loss computed alike (the array code) the
    executor's fit is the NumPy fit bit for bit: weights, scores, masks, BatchNorm state, optimizer
    state and every metric. With the loss kernel, the run is within its rounding of it."""
    args = [*FITS[net], *COMMON]
    cpu = fit(tmp_path, "cpu", [*args, "device=cpu"])
    before, replays = cuda_executor.LAUNCHES.copy(), Graph.replays
    exact = fit(tmp_path, "gpu-exact", [*args, "device=gpu"], monkeypatch, exact_loss=True)
    ran = {name for name, n in (cuda_executor.LAUNCHES - before).items() if n}
    assert ran == set(kernels.CUDA_KERNELS) - {"adam", "cross_entropy"} - ({"col2im"} if net == "mnist_fc" else set())
    assert Graph.replays - replays >= 3  # the steps ran as CUDA graphs, replayed (all but each shape's first)
    for name in ("weights", "scores", "masks", "norms"):
        for a, b in zip(getattr(cpu, name) or [], getattr(exact, name) or [], strict=True):
            same_bits(b, a)
    for slot in cpu.optimizer["slots"]:
        for a, b in zip(cpu.optimizer["slots"][slot], exact.optimizer["slots"][slot], strict=True):
            same_bits(b, a)
    for key in store.METRICS:
        if key != "epoch_seconds":
            np.testing.assert_array_equal(exact.metrics[key], cpu.metrics[key], err_msg=key)
    if net != "mnist_fc":  # the loss kernel inside a whole fit: once is enough (its bound is test_cross_entropy's)
        return
    monkeypatch.undo()
    before = cuda_executor.LAUNCHES.copy()
    kernel = fit(tmp_path, "gpu", [*args, "device=gpu"], monkeypatch)
    assert (cuda_executor.LAUNCHES - before)["cross_entropy"] > 0
    np.testing.assert_allclose(kernel.metrics["train_loss"], cpu.metrics["train_loss"], rtol=1e-3)
    assert abs(kernel.metrics["test_acc"][-1] - cpu.metrics["test_acc"][-1]) <= 0.02
