"""The mutation check of the CPU executor: copies of scoretrain/kernels.cu with one bug
each (every __syncthreads removed in turn, off-by-ones in loop bounds and spans, an initialisation
of shared memory dropped) must each make tests/test_cuda_executor.py's kernel tests fail. Each
mutant is built by the executor like the real source (cuda_executor.py reads it from
$CUDA_EXECUTOR_MUTANT in place of kernels.cu) and the tests run on it in their own process.

    .venv/bin/python tools/mutate_kernels.py            # a table: each mutant, caught or not, by what
Exit 0 when every mutant is caught. Takes a few minutes (a build and a test run per mutant).
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "scoretrain" / "kernels" / "kernels.cu"

# (name, the text to change, its replacement): off-by-ones, missing initialisations of shared memory
# (a mutant that changes nothing the kernel computes, like `b > 0` for `b >= 0` in topk_pick, whose
# digit is 0 when no bin above matched, would be no test of the tests)
EDITS = [
    ("straight_through: i <= n", "threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {\n        float v", "threadIdx.x; i <= n; i += (long long)gridDim.x * blockDim.x) {\n        float v"),
    ("sgd: i <= n", "threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {\n        float x = p[i], d = g[i];\n        if (wd != 0.0f) d = __fadd_rn(d, __fmul_rn(x, wd));\n        if (mu",
     "threadIdx.x; i <= n; i += (long long)gridDim.x * blockDim.x) {\n        float x = p[i], d = g[i];\n        if (wd != 0.0f) d = __fadd_rn(d, __fmul_rn(x, wd));\n        if (mu"),
    ("span_end: one past the chunk", "return start + CHUNK < end ? start + CHUNK : end;", "return start + CHUNK < end ? start + CHUNK + 1 : end;"),
    ("topk_histogram: i <= end", "for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {", "for (long long i = start + threadIdx.x; i <= end; i += blockDim.x) {"),
    ("topk_histogram: shared bins not zeroed", "for (int b = threadIdx.x; b < BINS; b += blockDim.x) local[b] = 0;", "for (int b = threadIdx.x + 1; b < BINS; b += blockDim.x) local[b] = 0;"),
    ("topk_pick: > for >= in the bin search", "if (above + h[b] >= remaining) {", "if (above + h[b] > remaining) {"),
    ("topk_count_ties: i <= end", "i < end; i += blockDim.x) c += (x[i] & MAGNITUDE) == t;", "i <= end; i += blockDim.x) c += (x[i] & MAGNITUDE) == t;"),
    ("topk_scan_ties: b <= the next group's first", "b < group_blocks[g + 1]; b++)", "b <= group_blocks[g + 1]; b++)"),
    ("topk_mask: a thread's span one longer", "last = first + ITEMS < end ? first + ITEMS : end;", "last = first + ITEMS < end ? first + ITEMS + 1 : end;"),
    ("topk_count_ties: the shared count not zeroed", "if (threadIdx.x == 0) count = 0;", "if (threadIdx.x == 0) (void)count;"),
    ("relu_backward: i <= n", "threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)\n        out[i] = __fmul_rn(d[i]", "threadIdx.x; i <= n; i += (long long)gridDim.x * blockDim.x)\n        out[i] = __fmul_rn(d[i]"),
    ("col2im: ty / stride > ho", "ty / stride >= ho", "ty / stride > ho"),
    ("cross_entropy: j <= c in the argmax", "for (int j = 1; j < c; j++)", "for (int j = 1; j <= c; j++)"),
    ("cross_entropy: the tree sum stops a level early", "for (int w = THREADS / 2; w > 0; w >>= 1) {", "for (int w = THREADS / 2; w > 1; w >>= 1) {"),
]


def mutants(source: str):
    """(name, mutated source) for each removed __syncthreads and each edit."""
    lines = source.splitlines(keepends=True)
    barriers = [i for i, line in enumerate(lines) if "__syncthreads();" in line]
    for i in barriers:
        kernel = [m.group(1) for line in lines[: i + 1] for m in [re.search(r"__global__ void (\w+)", line)] if m][-1]
        yield f"{kernel}: the __syncthreads of line {i + 1} removed", "".join(lines[:i] + [lines[i].replace("__syncthreads();", "")] + lines[i + 1:])
    for name, old, new in EDITS:
        assert source.count(old) == 1, f"mutation {name!r}: its text is not in kernels.cu once"
        yield name, source.replace(old, new)


def main() -> int:
    source = SOURCE.read_text()
    rows, missed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, code in mutants(source):
            path = Path(tmp) / "mutant.cu"
            path.write_text(code)
            env = dict(os.environ, CUDA_EXECUTOR_MUTANT=str(path))
            out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_cuda_executor.py",
                                  "-k", "not fit and not packed and not access_past and not unwritten"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            failed = re.search(r"^FAILED (\S+)", out.stdout, re.M)
            caught = out.returncode != 0
            missed += not caught
            why = ""
            if failed:
                why = failed.group(1).split("::")[-1]
                reason = re.search(r"(KernelFault: \S+ \S+|heap-buffer-overflow|global-buffer-overflow|runtime error: [^\n]{0,60}|AssertionError)", out.stdout)
                why += f" ({reason.group(1)})" if reason else ""
            rows.append((name, "caught" if caught else "MISSED", why))
            print(f"{'caught' if caught else 'MISSED'}  {name}  {why}", flush=True)
    print(f"\n{len(rows) - missed} of {len(rows)} mutants caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
