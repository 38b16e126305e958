"""What a run ran on: the libraries whose code computes its bits (NumPy, numba and llvmlite, the
BLAS library with its kernel and thread count, CuPy and CUDA, the conv engine with its library's
version and threads), the processor, and scoretrain itself (its git commit where it runs from a checkout). run.h5 keeps one record per session that
trained the run (store: `environments`); `fit --resume` says in one line when the continuation
runs on others, since the same code and seed can give other bits after a library upgrade.

The BLAS library is read with threadpoolctl: the one loaded at run time (NumPy's wheel bundles
its own OpenBLAS, whose kernel is chosen for the processor or by OPENBLAS_CORETYPE), not the one
NumPy was built against.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

from .. import __version__

# the entries that change a run's bits when they change (not the host's name or the OS)
BITS = ("numpy", "numba", "llvmlite", "blas", "conv_engine", "cupy", "cuda", "gpu", "cpu")
RECORDED_SINCE = {"conv_engine": "im2col"}  # what a record written before the entry existed ran on


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The checkout's commit (with '+changes' where files differ from it), or None outside one."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "scoretrain"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas() -> str:
    """'openblas 0.3.31 (SkylakeX kernel, 2 threads)'."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl is not installed)"
    found = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    # NumPy's own (its wheel's numpy.libs): another package's BLAS loaded later in the process
    # (SciPy's, say) computes none of a run's bits and would make a resume look like a new library
    import numpy

    site = str(Path(numpy.__file__).parent)
    own = [i for i in found if str(i.get("filepath", "")).startswith((site + "/", site + ".libs/"))]
    found = own or found
    if not found:
        return "none found"
    return "; ".join(f"{i['internal_api']} {i.get('version') or '?'} ({i.get('architecture') or '?'} kernel, "
                     f"{i['num_threads']} thread{'s' if i['num_threads'] != 1 else ''})" for i in found)


def describe(backend, engine=None) -> dict[str, str | None]:
    """This process's record, for a run on `backend` whose convs `engine` computes
    (kernels/conv_engine.py; None: im2col)."""
    env = {
        "scoretrain": __version__ + (f" ({commit})" if (commit := _commit()) else ""),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "llvmlite": _version("llvmlite"),
        "h5py": _version("h5py"),
        "blas": _blas(),
        "conv_engine": engine.describe() if engine is not None else "im2col",
        "cpu": _cpu(),
        "os": platform.platform(),
        "cupy": None,
        "cuda": None,
        "gpu": None,
    }
    if backend.is_gpu:
        cp = backend.xp
        env["cupy"] = getattr(cp, "__version__", None)
        try:
            rt, drv = cp.cuda.runtime.runtimeGetVersion(), cp.cuda.runtime.driverGetVersion()
            env["cuda"] = f"runtime {rt // 1000}.{rt % 1000 // 10}, driver {drv // 1000}.{drv % 1000 // 10}"
            env["gpu"] = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
        except Exception:  # a stand-in, or a driver that will not say
            pass
    return env


def differences(old: dict, new: dict) -> list[str]:
    """'numpy 2.3.1 -> 2.4.0' for each entry in BITS that differs."""
    before = lambda k: old.get(k, RECORDED_SINCE.get(k))  # noqa: E731
    return [f"{k} {before(k)} -> {new.get(k)}" for k in BITS if before(k) != new.get(k)]
