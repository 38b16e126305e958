"""kernels.cu compiles as CuPy will compile it on a GPU machine: CuPy's own options and headers,
NVRTC from its wheel, for sm_80 (A100) and sm_90 (H100/H200), to cubins and to PTX with no
contracted multiply-add (tools/compile_cuda.py). No GPU is needed; `make test` installs CuPy and
NVRTC into .venv/nvrtc, apart from the venv, for this test alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scoretrain.kernels.loops import CUDA_KERNELS

REPO = Path(__file__).resolve().parents[1]
NVRTC = Path(os.environ.get("SCORETRAIN_NVRTC", REPO / ".venv" / "nvrtc"))


def test_kernels_compile_with_nvrtc_as_cupy_compiles_them(tmp_path):
    libs = sorted(NVRTC.glob("nvidia/*/lib"))
    if not (NVRTC / "cupy").is_dir() or not libs:
        pytest.skip(f"CuPy and NVRTC are not installed in {NVRTC} (make test installs them)")
    env = dict(os.environ, PYTHONPATH=str(NVRTC), LD_LIBRARY_PATH=os.pathsep.join(map(str, libs)),
               CUPY_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(REPO / "tools" / "compile_cuda.py"), "80", "90"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads(out.stdout)
    assert report["options"][-1] == "-ftz=true" and "--std=c++17" in report["options"]  # CuPy's, as it appends them
    for arch in ("80", "90"):
        cubin, ptx = report["archs"][arch]["cubin"], report["archs"][arch]["ptx"]
        assert cubin["ok"] and cubin["bytes"] > 10_000
        assert sorted(ptx["entries"]) == sorted(CUDA_KERNELS)
        assert ptx["fma"] == {}  # every float operation rounds on its own, as on the CPU (but in expf/logf)
