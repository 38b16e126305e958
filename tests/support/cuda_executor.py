"""kernels.cu executed on the CPU, as CuPy would launch it on a GPU: a stand-in for
`cupy.RawModule(code=..., options=...)` and `get_function(name)(grid, block, args)`.

The source is compiled as it is, with g++, against cuda_executor/cuda_runtime.h (CUDA's
built-ins), with AddressSanitizer and UndefinedBehaviorSanitizer and -ffp-contract=off (the
__f*_rn intrinsics round once each, as on a GPU). cuda_executor/executor.cpp runs the blocks one
after another and a block's threads as fibers that meet at each __syncthreads, in orders permuted
by a seed, with __shared__ memory filled with garbage at each block's start, and every array
argument in a buffer of exactly its size. CuPy compiles with -ftz=true, so the executor flushes
subnormals to zero as the GPU will (the CPU's NumPy does not: the one place where a GPU's bits
may differ from the CPU's in an otherwise exact kernel).

Each argument is packed as CuPy packs it (cupy/cuda/function.pyx, _pointer): a device array as
its pointer, None as a null pointer, a NumPy scalar at its own width, a Python int (bool too) as
int64, a float as float64, a complex as complex128, anything else a TypeError. The packed value
is then checked against the kernel's declared parameter (its size, and float or integer), so a
scalar of the wrong width is an error here, not garbage on a GPU.

The executor is a process of its own (ASan must own the process's allocator): a launch sends the
arrays, runs, and copies back those the kernel may write (a non-const pointer). A sanitizer's
report ends that process and becomes a KernelFault naming the kernel. Builds are cached by the
hash of everything that goes into them, in build/cuda_executor (SCORETRAIN_EXECUTOR_CACHE).
"""

from __future__ import annotations

import atexit
import collections
import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "cuda_executor"
CACHE = Path(os.environ.get("SCORETRAIN_EXECUTOR_CACHE", HERE.parents[2] / "build" / "cuda_executor"))
CXX = os.environ.get("CXX", "g++")
KERNELS_CU = HERE.parents[2] / "scoretrain" / "kernels" / "kernels.cu"
FLAGS = ("-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off", "-no-pie",
         "-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all")
RUNTIME_FLAGS = ("-std=c++17", "-O2", "-g", "-no-pie")
ENV = {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=0",
       "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
CUPY_OPTIONS = ("-ftz=true",)  # what cupy.cuda.compiler appends to a RawModule's options
QUIT = 0xFFFFFFFF

# C types of kernel parameters: their size, and whether they hold a float
C_TYPES = {"bool": (1, "b"), "char": (1, "i"), "signed char": (1, "i"), "unsigned char": (1, "i"), "short": (2, "i"),
           "unsigned short": (2, "i"), "int": (4, "i"), "unsigned int": (4, "i"), "unsigned": (4, "i"), "long": (8, "i"),
           "unsigned long": (8, "i"), "long long": (8, "i"), "unsigned long long": (8, "i"), "int32_t": (4, "i"),
           "uint32_t": (4, "i"), "int64_t": (8, "i"), "uint64_t": (8, "i"), "size_t": (8, "i"), "float": (4, "f"),
           "double": (8, "f"), "void": (0, "")}


class ExecutorUnavailable(RuntimeError):
    """No C++ compiler, or the module does not compile."""


class KernelFault(AssertionError):
    """A sanitizer's error, or a crash, inside a kernel."""


class LaunchError(TypeError):
    """A launch CuPy or CUDA would refuse, or one whose arguments do not match the kernel's."""


@dataclass(frozen=True)
class Param:
    text: str  # as declared, "const float* lr_at"
    type: str  # "const float*"
    name: str
    pointer: bool
    const: bool  # a pointer to const: the kernel cannot write through it
    size: int  # of the value, or of the pointee for a pointer (0: void)
    kind: str  # "f" float, "i" integer, "b" bool


def _param(text: str) -> Param:
    text = " ".join(text.split())
    m = re.fullmatch(r"(.*?)\s*(\w+)", text)
    ctype, name = m.group(1), m.group(2)
    pointer = ctype.endswith("*")
    base = ctype.rstrip("*").replace("__restrict__", "").strip()
    const = pointer and base.startswith("const ")
    base = base.removeprefix("const ").strip()
    if base not in C_TYPES:
        raise ExecutorUnavailable(f"parameter {text!r}: type {base!r} is not one the executor knows")
    size, kind = C_TYPES[base]
    return Param(text, ctype, name, pointer, const, size, kind)


def parse_kernels(code: str) -> dict[str, list[Param]]:
    """Each __global__ function of the source: its parameters, as declared."""
    found = {}
    for m in re.finditer(r"__global__\s+void\s+(\w+)\s*\(([^)]*)\)", code):
        params = [p for p in m.group(2).split(",") if p.strip()]
        found[m.group(1)] = [_param(p) for p in params]
    return found


def _functions(code: str) -> set[str]:
    """The names of the source's __global__ and __device__ functions (their static locals are
    __shared__ variables)."""
    return set(re.findall(r"__(?:global|device)__[^(;{}]*?\b(\w+)\s*\(", code))


def _dispatch(kernels: dict[str, list[Param]]) -> str:
    """dispatch.cpp: each kernel called with its arguments read from cuLaunchKernel's void** form."""
    lines = ['#include "cuda_runtime.h"', "struct Kernel { const char* name; void (*call)(void**); };", 'extern "C" {']
    lines += [f"void {name}({', '.join(p.text for p in params)});" for name, params in kernels.items()]
    lines.append("}")
    for i, (name, params) in enumerate(kernels.items()):
        args = ", ".join(f"*({p.type}*)p[{j}]" for j, p in enumerate(params))
        lines.append(f"static void call_{i}(void** p) {{ {name}({args}); }}")
    lines.append("extern const Kernel KERNELS[] = {" + ", ".join(f'{{"{n}", call_{i}}}' for i, n in enumerate(kernels)) + "};")
    lines.append(f"extern const unsigned N_KERNELS = {len(kernels)};")
    return "\n".join(lines) + "\n"


def build(code: str) -> Path:
    """The executor binary for this source (cached; built once per content)."""
    if shutil.which(CXX) is None:
        raise ExecutorUnavailable(f"no C++ compiler ({CXX}): install g++ to run the CUDA kernels on the CPU")
    kernels = parse_kernels(code)
    runtime = [(HERE / f).read_text() for f in ("cuda_runtime.h", "executor.cpp")]
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([code, *runtime, version, *FLAGS, *RUNTIME_FLAGS]).encode()).hexdigest()[:20]
    folder = CACHE / key
    binary = folder / "executor"
    if binary.exists():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes build it once
        if binary.exists():
            return binary
        (folder / "module.cu").write_text(code)
        (folder / "dispatch.cpp").write_text(_dispatch(kernels))
        tmp = folder / f"executor.{os.getpid()}"
        # the module under the sanitizers; the scheduler and the dispatch table, its hot loop, without
        cmds = [[CXX, *FLAGS, f"-I{HERE}", "-include", "cuda_runtime.h", "-x", "c++", "-c", str(folder / "module.cu"), "-o", str(folder / "module.o")],
                [CXX, *RUNTIME_FLAGS, f"-I{HERE}", "-c", str(HERE / "executor.cpp"), "-o", str(folder / "executor.o")],
                [CXX, *RUNTIME_FLAGS, f"-I{HERE}", "-c", str(folder / "dispatch.cpp"), "-o", str(folder / "dispatch.o")],
                [CXX, *FLAGS, *(str(folder / f) for f in ("module.o", "executor.o", "dispatch.o")), "-o", str(tmp)]]
        for cmd in cmds:
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise ExecutorUnavailable(f"the module does not build for the CPU executor ({' '.join(cmd)}):\n{out.stderr[-4000:]}")
        names = _functions(code)
        table = subprocess.run(["nm", "-S", "--defined-only", "-C", str(tmp)], capture_output=True, text=True, check=True).stdout
        shared = []
        for line in table.splitlines():  # "address size type function::variable"
            parts = line.split(maxsplit=3)
            if len(parts) == 4 and parts[2] in "bBdD" and "::" in parts[3] and parts[3].split("::")[0] in names:
                shared.append(f"{parts[3].split('::')[0]} {parts[0]} {parts[1]}")
        (folder / "shared.txt").write_text("\n".join(shared) + "\n")
        os.replace(tmp, binary)
    return binary


class Executor:
    """One executor process for a binary, started on first use and again after a fault."""

    def __init__(self, binary: Path, ftz: bool):
        self.binary, self.ftz, self.proc = binary, ftz, None

    def _start(self):
        self.errors = tempfile.TemporaryFile()
        args = [str(self.binary), str(self.binary.with_name("shared.txt"))] + (["ftz"] if self.ftz else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                     env=dict(os.environ, **ENV), bufsize=0)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write(struct.pack("<I", QUIT))
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc = None

    def launch(self, index: int, name: str, grid, block, seed: int, buffers, args) -> None:
        """buffers: [(array, written)]; args: ("buffer", i) | ("value", bytes) | ("null", None)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        parts = [struct.pack("<I3I3IQI", index, *grid, *block, seed, len(buffers))]
        for a, written in buffers:
            parts += [struct.pack("<QB", a.nbytes, written), _bytes(a)]
        parts.append(struct.pack("<I", len(args)))
        for kind, v in args:
            if kind == "buffer":
                parts.append(struct.pack("<BI", 0, v))
            elif kind == "value":
                parts.append(struct.pack("<BI", 1, len(v)) + v)
            else:
                parts.append(struct.pack("<B", 2))
        try:
            for p in parts:
                self.proc.stdin.write(p)
            _read(self.proc.stdout, 4)  # the status word: 0 (a fault ends the process instead)
            for a, written in buffers:
                if written:
                    _read_into(self.proc.stdout, _bytes(a))
        except (OSError, EOFError):
            self._fault(name, grid, block)

    def _fault(self, name, grid, block):
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        code, self.proc = self.proc.returncode, None
        self.errors.seek(0)
        report = self.errors.read().decode(errors="replace")
        lines = [l.strip() for l in report.splitlines() if re.search(r"ERROR: AddressSanitizer|runtime error:", l)]
        where = [l.strip() for l in report.splitlines() if "module.cu:" in l][:3]
        raise KernelFault(f"kernel {name} (grid {grid}, block {block}): {lines[0] if lines else f'the executor died (exit {code})'}"
                          f"{' at ' + ' <- '.join(where) if where else ''}\n{report[-6000:]}")


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.view(np.ndarray).reshape(-1).view(np.uint8))


def _read(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _read_into(stream, view: memoryview) -> None:
    done = 0
    while done < len(view):
        got = stream.readinto(view[done:])
        if not got:
            raise EOFError
        done += got


_executors: dict[tuple[Path, bool], Executor] = {}
LAUNCHES: collections.Counter = collections.Counter()  # kernel name -> launches, in this process


@atexit.register
def _close_all():
    for e in _executors.values():
        e.close()


# --- CuPy's calling convention ----------------------------------------------------------------

_NUMPY_SCALARS = {np.dtype(c).type for c in "?bhilqBHILQefdFD"}  # CuPy packs these at their width


def pack(x, device_array=np.ndarray):
    """One argument as CuPy's _pointer packs it: ("buffer", array), ("null", None) or
    ("value", NumPy scalar)."""
    if x is None:
        return "null", None
    if isinstance(x, device_array):
        return "buffer", x
    if isinstance(x, np.ndarray):
        raise LaunchError(f"Unsupported type {type(x)} (a host array: a kernel takes device arrays)")
    if type(x) not in _NUMPY_SCALARS:
        if isinstance(x, int):  # bool too: True is an int, packed as int64
            x = np.int64(x)
        elif isinstance(x, float):
            x = np.float64(x)
        elif isinstance(x, complex):
            x = np.complex128(x)
        else:
            raise LaunchError(f"Unsupported type {type(x)}")
    return "value", x


def _check_dims(what: str, dims, limits) -> tuple[int, int, int]:
    if not isinstance(dims, tuple):
        raise LaunchError(f"{what} must be a tuple (CuPy's Function takes tuples), got {type(dims).__name__}")
    dims = (dims + (1, 1))[:3]
    if not all(isinstance(d, (int, np.integer)) for d in dims):
        raise LaunchError(f"{what} {dims}: not integers")
    dims = tuple(max(1, int(d)) for d in dims)  # as CuPy: max(1, d)
    for d, limit, axis in zip(dims, limits, "xyz"):
        if d > limit:
            raise LaunchError(f"{what}.{axis} = {d} is over CUDA's limit of {limit}")
    return dims


class Launch:
    """One kernel launch, its arguments packed and checked: device arrays by reference, host
    scalars by value (what a CUDA graph keeps of it). Calling it runs the kernel."""

    def __init__(self, function: Function, grid, block, args, shared_mem=0):
        f = function
        self.function, self.name = f, f.name
        self.grid = _check_dims("grid", grid, (2**31 - 1, 65535, 65535))
        self.block = _check_dims("block", block, (1024, 1024, 64))
        if self.block[0] * self.block[1] * self.block[2] > 1024:
            raise LaunchError(f"block {self.block}: more than 1024 threads")
        if shared_mem:
            raise LaunchError("dynamic shared memory: the executor supports static __shared__ only")
        if not isinstance(args, (tuple, list)):
            raise LaunchError(f"args must be a tuple, got {type(args).__name__}")
        params = f.params
        if len(args) != len(params):
            raise LaunchError(f"kernel {f.name} takes {len(params)} arguments ({', '.join(p.text for p in params)}), given {len(args)}")
        self.buffers, self.args = [], []
        for i, (a, p) in enumerate(zip(args, params)):
            kind, v = pack(a, f.module.device_array)
            where = f"kernel {f.name}, argument {i} ({p.text})"
            if p.pointer:
                if kind == "value":
                    raise LaunchError(f"{where}: a pointer, given a {type(v).__name__} scalar ({v.itemsize} bytes)")
                if kind == "null":
                    self.args.append(("null", None))
                    continue
                if not v.flags.c_contiguous:
                    raise LaunchError(f"{where}: a non-contiguous array (the kernel reads its memory as laid out)")
                if p.size and v.itemsize != p.size:
                    raise LaunchError(f"{where}: an array of {v.dtype} ({v.itemsize} bytes) where the kernel reads {p.size}-byte elements")
                self.args.append(("buffer", self._buffer(v, not p.const, where)))
            else:
                if kind != "value":
                    raise LaunchError(f"{where}: a value, given {'an array' if kind == 'buffer' else 'None'}")
                if v.itemsize != p.size:
                    raise LaunchError(f"{where}: {p.size} bytes, but CuPy packs {type(v).__name__} as {v.itemsize}")
                dkind = {"f": "f", "b": "b"}.get(v.dtype.kind, "i")
                if dkind != p.kind:
                    raise LaunchError(f"{where}: a {'float' if p.kind == 'f' else 'bool' if p.kind == 'b' else 'integer'}, given {v.dtype}")
                self.args.append(("value", v.tobytes()))

    def _buffer(self, a: np.ndarray, written: bool, where: str) -> int:
        """The buffer index of array a: arguments with the same memory share one buffer; partly
        overlapping ones cannot be given a buffer each, and are refused."""
        lo = a.__array_interface__["data"][0]
        for i, (b, w) in enumerate(self.buffers):
            blo = b.__array_interface__["data"][0]
            if (blo, b.nbytes) == (lo, a.nbytes):
                self.buffers[i] = (b, w or written)
                return i
            if lo < blo + b.nbytes and blo < lo + a.nbytes and a.nbytes and b.nbytes:
                raise LaunchError(f"{where}: overlaps another argument's memory in part")
        self.buffers.append((a, written))
        return len(self.buffers) - 1

    @property
    def written(self) -> list[np.ndarray]:
        """The arrays the kernel may write (through a non-const pointer)."""
        return [a for a, w in self.buffers if w]

    def __call__(self) -> None:
        f = self.function
        seed = zlib.crc32(f"{f.module.seed} {f.name} {f.launches}".encode())
        f.launches += 1
        LAUNCHES[f.name] += 1
        f.module.executor.launch(f.index, f.name, self.grid, self.block, seed, self.buffers, self.args)


class Function:
    """cupy.RawModule.get_function's: called as f(grid, block, args)."""

    def __init__(self, module: RawModule, name: str):
        if name not in module.kernels:
            raise LaunchError(f"no kernel named {name!r} in the module (it has {', '.join(module.kernels)})")
        self.module, self.name = module, name
        self.index, self.params = list(module.kernels).index(name), module.kernels[name]
        self.launches = 0

    def __call__(self, grid, block, args, shared_mem=0, stream=None) -> None:
        Launch(self, grid, block, args, shared_mem)()


class RawModule:
    """cupy.RawModule(code=..., options=...), executed on the CPU. `device_array`: the type that
    counts as device memory (strict_cupy.DeviceArray there; any ndarray by default); `seed`
    varies the thread and block orders and the shared-memory garbage."""

    def __init__(self, code: str, options: tuple = (), name_expressions=None, *, device_array=np.ndarray, seed: int = 0):
        mutant = os.environ.get("CUDA_EXECUTOR_MUTANT")  # tools/mutate_kernels.py: a bug put in kernels.cu
        if mutant and code == KERNELS_CU.read_text():
            code = Path(mutant).read_text()
        self.kernels = parse_kernels(code)
        self.device_array, self.seed = device_array, seed
        options = tuple(options) + CUPY_OPTIONS
        ftz = [o for o in options if o.startswith("-ftz=")][-1] == "-ftz=true"
        binary = build(code)
        self.executor = _executors.setdefault((binary, ftz), Executor(binary, ftz))

    def get_function(self, name: str) -> Function:
        return Function(self, name)
