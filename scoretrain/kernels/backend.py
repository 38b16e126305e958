"""The array module: NumPy on the CPU, CuPy on a GPU. The model and training code are
written once against `backend.xp`; CuPy is imported only when a GPU is asked for or found.
The few passes over every weight per step run as fused loops where `fused` finds them."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ..errors import DeviceError


@dataclass
class Backend:
    xp: ModuleType
    device: str  # "cpu" or "gpu:N"

    @property
    def name(self) -> str:
        return self.xp.__name__

    @property
    def is_gpu(self) -> bool:
        return self.xp is not np

    def asarray(self, a, dtype=None):
        """Host array -> device array (a no-op on the CPU)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_host(self, a) -> np.ndarray:
        """A host copy (never a view: the device array keeps changing as training goes on)."""
        return a.get() if self.is_gpu else np.array(a)

    def sync(self) -> None:
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()


def fused(xp, *arrays):
    """The fused loops (kernels/loops.py) that take these arrays, or None where the array code runs.
    They take contiguous float32 arrays (and see them flat, as a.reshape(-1), a view): on NumPy
    every loop, as numba code; on CuPy (an array module with a RawModule: the tests' stand-in
    runs the same kernels on the CPU) the CUDA kernels of kernels.cu. float64 (the gradient
    checks) takes the array code."""
    if not all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays):
        return None
    if xp is np:
        return _kernels()
    return _kernels().cuda(xp) if hasattr(xp, "RawModule") else None  # CuPy (or a stand-in that runs kernels)


def load_kernels(xp) -> None:
    """Import the fused loops now, before a run folder exists: numba's import can fail (a broken
    install; a memory limit, ulimit -v, too low for its compiler's library), and the error
    should be one line before anything is written, not a failed run."""
    try:
        fused(xp)
    except (ImportError, OSError) as e:
        hint = "raise the process's memory limit (ulimit -v)" if address_limit() else "reinstall scoretrain's dependencies (numba, llvmlite)"
        raise DeviceError(f"the CPU's compiled loops cannot be loaded (numba: {str(e).splitlines()[0][:160]}): {hint}") from None


def address_limit() -> int | None:
    """The process's address-space limit in bytes (ulimit -v), None where there is none (or no
    POSIX resource module)."""
    try:
        import resource
    except ImportError:
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if limit == resource.RLIM_INFINITY else limit


@functools.cache  # called in the hot path: an import statement costs a microsecond or two
def _kernels():
    """scoretrain.kernels, imported on first use: numba takes ~0.4 s to import."""
    from . import loops as kernels

    return kernels


def extra_for(driver_version: int | None) -> str:
    """The install extra whose CuPy matches a CUDA driver (cudaDriverGetVersion: 12080 is 12.8)."""
    major = (driver_version or 0) // 1000
    return f"scoretrain[cuda{major}]" if major in (12, 13) else "scoretrain[cuda12] or scoretrain[cuda13] (the CUDA version nvidia-smi shows)"


def _cupy():
    """(cupy, device count), or (None, why not). A GPU counts only once one kernel compiles and one
    GEMM runs on it: CuPy imports and finds a device without NVRTC or cuBLAS, and would fail only
    at the first training step."""
    try:
        import cupy
    except Exception as e:  # not installed, or a broken install
        return None, f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    driver = None
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
        n = cupy.cuda.runtime.getDeviceCount()
        if n == 0:
            return None, "no CUDA device found"
        probe = cupy.ElementwiseKernel("float32 x", "float32 y", "y = x * 2.0f", "scoretrain_probe")
        a = probe(cupy.ones((8, 8), dtype=cupy.float32))
        if float((a @ a).sum().get()) != 8 * 8 * 8 * 4:
            return None, "a test GEMM on the GPU gave a wrong result"
    except Exception as e:  # no driver, no NVRTC (kernel compile), no cuBLAS (GEMM)
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return None, f"{e.__class__.__name__}: {first}; install {extra_for(driver)}, which brings CUDA's libraries"
    return cupy, n


def _cpu() -> Backend:
    keep_freed_memory()
    return Backend(np, "cpu")


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep what a training step frees for the next step, instead of giving
    it back to the OS and taking it again: a step allocates and frees its activations and im2col
    patches (~500 MB for resnet20 at batch 128), and every page the OS hands out again is a page
    fault that zeroes it, ~15,000 a step, a third of a resnet20 step on a 2-core VM.
    Blocks up to 32 MB (glibc's most) come from the heap, which is never trimmed; the process
    holds its peak. False where the C library is not glibc (nothing changes)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def resolve(device: str) -> Backend:
    """`auto` | `cpu` | `gpu` | `gpu:N` -> a Backend. `auto` takes GPU 0 when CuPy can use it, and
    says in one line on stderr why it takes the CPU where CuPy is installed but cannot."""
    if device == "cpu":
        return _cpu()
    found = _cupy()
    if device == "auto":
        if found[0] is None:
            if "ModuleNotFoundError" not in found[1]:  # CuPy is there, but the GPU is not usable
                print(f"note: device auto: training on the CPU, the GPU is not usable ({found[1]})", file=sys.stderr)
            return _cpu()
        device = "gpu:0"
    if found[0] is None:
        hint = "" if "install scoretrain[" in found[1] else f"; install {extra_for(None)}"
        raise DeviceError(f"device {device}: no usable GPU ({found[1]}){hint}, or use device=cpu")
    cupy, count = found
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= count:
        raise DeviceError(f"device {device}: only {count} GPU(s) present (gpu:0..gpu:{count - 1})")
    cupy.cuda.Device(index).use()
    return Backend(cupy, f"gpu:{index}")
