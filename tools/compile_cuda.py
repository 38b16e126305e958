"""Compile scoretrain/kernels.cu as CuPy compiles a RawModule, without a GPU: CuPy's own compiler
options (cupy._core.core.assemble_cupy_compiler_options: its headers, the C++ standard, then
-ftz=true as cupy.cuda.compiler adds it) and NVRTC from its wheel, for each architecture given,
to a cubin (what CuPy loads) and to PTX, which is checked: every kernel is there, and no float
multiply-add is contracted into an FMA (the CPU rounds twice there), but in the kernels that call
CUDA's expf/logf (kernels.CUDA_LIBM_KERNELS), whose library code uses FMAs.

Needs CuPy and NVRTC importable (tests/test_nvrtc.py runs it with the ones `make test` installs
into .venv/nvrtc); only the device queries CuPy makes to choose -arch are replaced, by the
architecture asked for. Prints one JSON object; exit 1 if any check fails.
    python tools/compile_cuda.py 80 90
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(archs: list[str]) -> int:
    import cupy
    import cupy._core.core as core
    from cupy.cuda import compiler

    from scoretrain.kernels.loops import CUDA_KERNELS, CUDA_LIBM_KERNELS, CUDA_OPTIONS, CUDA_SOURCE

    source = CUDA_SOURCE.read_text()
    # RawModule -> compile_with_cache: CuPy's options, then _compile_with_cache_cuda adds -ftz=true
    options = tuple(core.assemble_cupy_compiler_options(CUDA_OPTIONS)) + ("-ftz=true",)
    report = {"cupy": cupy.__version__, "nvrtc": ".".join(map(str, compiler._get_nvrtc_version())), "options": list(options), "archs": {}}
    ok = True
    for arch in archs:
        out = {}
        for kind in ("cubin", "ptx"):
            # the one device query: which -arch (CuPy asks the current device for it)
            compiler._get_arch_for_options_for_nvrtc = lambda a=None, kind=kind: (f"-arch={'sm' if kind == 'cubin' else 'compute'}_{a}", kind)
            try:
                binary = compiler.compile_using_nvrtc(source, options, arch=arch)
                binary = binary[0] if isinstance(binary, tuple) else binary  # (code, name mapping) in newer CuPy
            except compiler.CompileException as e:
                out[kind] = {"ok": False, "error": str(e)[:2000]}
                ok = False
                continue
            out[kind] = {"ok": True, "bytes": len(binary)}
            if kind == "ptx":
                ptx = binary.decode() if isinstance(binary, bytes) else binary
                entries = re.findall(r"\.entry (\w+)\(", ptx)
                fma = {}  # per kernel: its contracted multiply-adds, where it claims the CPU's roundings
                for body in re.split(r"(?=\.visible \.entry )", ptx)[1:]:
                    name = re.match(r"\.visible \.entry (\w+)", body).group(1)
                    found = [line.strip() for line in body.splitlines() if re.search(r"\b(fma|mad)\.\S*f32", line)]
                    if found and name not in CUDA_LIBM_KERNELS:
                        fma[name] = found[:3]
                out[kind].update(entries=entries, fma=fma, ftz=bool(re.search(r"\.ftz\.f32", ptx)))
                if sorted(entries) != sorted(CUDA_KERNELS) or fma:
                    out[kind]["ok"] = ok = False
        report["archs"][arch] = out
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["80", "90"]))
