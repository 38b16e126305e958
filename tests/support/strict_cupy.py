"""A strict CuPy stand-in for CI, which has no GPU: NumPy, with CuPy's rules for what stays on the
device. Reductions and scalar indexing give 0-d device arrays (not host scalars, as NumPy does),
and a device array refuses everything that would read it back to the host in CuPy: bool(),
int(), float(), __index__, .item(), .tolist(). `.get()` is the explicit copy to the host, and
`asarray` of a host array a copy to the device (never a view of the host's memory).

Its RawModule runs kernels.cu on the CPU executor (cuda_executor.py), so the training loop gets
kernels.cuda() as on a GPU, and every CUDA kernel runs where CuPy would launch it.

It also simulates CUDA graphs (xp.cuda: Stream.begin_capture / end_capture, Graph.launch). While
a stream captures, every operation on device arrays is recorded with the arrays it read and
wrote (kept by reference: a graph's fixed addresses) and the host scalars it was given (by value:
frozen, as kernel arguments are); a launch replays the record. A copy from the host to the device
while capturing is refused, as CuPy refuses it. The capture runs the operations too (the code
needs their results' shapes), but end_capture undoes every write they made to arrays that
existed before, so that, as on a GPU, a capture changes nothing and its first launch runs the
step. A replay that differs from running the code again means the code keeps state that a graph
cannot see."""

import contextlib
import functools
import types

import numpy as np

from . import cuda_executor


class HostRead(AssertionError):
    """A device-to-host read (a synchronization on a GPU) where none may be."""


class CaptureError(AssertionError):
    """Something a stream capture cannot hold (a copy from the host)."""


_record = None  # the operations of the capture under way, or None
_reads_allowed = False  # allowing_reads(): host reads are synchronizations, not errors


@contextlib.contextmanager
def allowing_reads():
    """Host reads allowed, as CuPy allows them (each a synchronization): for a whole `fit`, whose
    epoch ends read the loss back. The batch loop is checked without (tests/test_host_reads.py)."""
    global _reads_allowed
    _reads_allowed = True
    try:
        yield
    finally:
        _reads_allowed = False
_undo = []  # (array, its contents before the capture wrote it), to restore at the capture's end


def _will_write(*arrays) -> None:
    if _record is not None:
        _undo.extend((a, a.copy()) for a in arrays if isinstance(a, np.ndarray))


def _base(a):
    """Plain NumPy views of device arrays, inside lists, tuples and dicts too."""
    if isinstance(a, DeviceArray):
        return a.view(np.ndarray)
    if isinstance(a, (list, tuple)):
        return type(a)(_base(v) for v in a)
    if isinstance(a, dict):
        return {k: _base(v) for k, v in a.items()}
    return a


def _frozen(a):
    """What a recorded operation keeps: device arrays by reference, host values by value."""
    if isinstance(a, DeviceArray):
        return a.view(np.ndarray)
    if isinstance(a, np.ndarray):
        return a.copy()
    if isinstance(a, (list, tuple)):
        return type(a)(_frozen(v) for v in a)
    if isinstance(a, dict):
        return {k: _frozen(v) for k, v in a.items()}
    return a


def _is_view(result, *sources) -> bool:
    """(On plain views: may_share_memory on a device array would be an operation of its own.)"""
    return isinstance(result, np.ndarray) and any(
        isinstance(s, np.ndarray) and np.may_share_memory(result.view(np.ndarray), s.view(np.ndarray)) for s in sources)


def _copy_into(out, value):
    np.copyto(out, value, casting="unsafe")


def _copying(name):
    """An ndarray method that computes or copies without a ufunc, recorded where it copies."""
    def method(self, *args, **kwargs):
        out = np.asarray(getattr(np.ndarray, name)(self.view(np.ndarray), *_base(args), **_base(kwargs)))
        if _record is not None and not _is_view(out, self.view(np.ndarray)):
            src, a, k, dst = self.view(np.ndarray), _frozen(args), _frozen(kwargs), out
            _record.append(lambda: _copy_into(dst, getattr(np.ndarray, name)(src, *a, **k)))
        return out.view(DeviceArray)

    return method


class DeviceArray(np.ndarray):
    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return np.asarray(arr).view(DeviceArray)  # 0-d results stay arrays, as in CuPy

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        outs = kwargs.get("out")
        if outs is not None:
            kwargs["out"] = _base(outs if isinstance(outs, tuple) else (outs,))
        _will_write(*_base(kwargs.get("out", ())), *(_base(inputs[:1]) if method == "at" else ()))
        result = getattr(ufunc, method)(*_base(inputs), **_base(kwargs))
        if method == "at":
            if _record is not None:
                ins, kw = _frozen(inputs), _frozen(kwargs)
                _record.append(lambda: getattr(ufunc, method)(*ins, **kw))
            return None
        if outs is not None:
            wrapped = outs if isinstance(outs, tuple) else (outs,)
        else:
            many = isinstance(result, tuple)
            wrapped = tuple(np.asarray(r).view(DeviceArray) for r in (result if many else (result,)))
        if _record is not None:
            ins, kw = _frozen(inputs), _frozen({k: v for k, v in kwargs.items() if k != "out"})
            kw["out"] = tuple(w.view(np.ndarray) for w in wrapped)
            _record.append(lambda: getattr(ufunc, method)(*ins, **kw))
        return wrapped if len(wrapped) > 1 else wrapped[0]

    def __array_function__(self, func, types_, args, kwargs):
        if func in (np.copyto, np.put, np.place, np.putmask):  # the functions that write their first argument
            _will_write(_base(args[0]))
        result = func(*_base(args), **_base(kwargs))
        results = result if isinstance(result, tuple) else (result,)
        sources = _arrays(args, kwargs)
        views = all(isinstance(r, np.ndarray) and _is_view(r, *sources) for r in results)
        if _record is not None and not views and func not in (np.empty_like,):  # (an allocation alone: nothing to replay)
            fa, fk = _frozen(args), _frozen(kwargs)

            def replay():  # run it again (in-place functions write their inputs), into the same outputs
                again = func(*fa, **fk)
                for out, value in zip(results, again if isinstance(again, tuple) else (again,)):
                    if isinstance(out, np.ndarray) and out.flags.writeable:
                        _copy_into(out, value)
            _record.append(replay)
        return device(result)

    def __getitem__(self, index):
        out = super().__getitem__(index)
        out = out if isinstance(out, np.ndarray) else np.asarray(out)
        if _record is not None and not _is_view(out, self.view(np.ndarray)):
            src, idx, dst = self.view(np.ndarray), _frozen(index), out.view(np.ndarray)
            _record.append(lambda: _copy_into(dst, src[idx]))
        return out.view(DeviceArray)

    def __setitem__(self, index, value):
        _will_write(self.view(np.ndarray))
        super().__setitem__(index, value)
        if _record is not None:
            dst, idx, val = self.view(np.ndarray), _frozen(index), _frozen(value)
            _record.append(lambda: dst.__setitem__(idx, val))

    # the methods that compute or copy without a ufunc (the reductions go through __array_ufunc__)
    astype, copy, reshape, ravel, flatten = (_copying("astype"), _copying("copy"), _copying("reshape"),
                                             _copying("ravel"), _copying("flatten"))
    argmax, argmin, cumsum = _copying("argmax"), _copying("argmin"), _copying("cumsum")

    def fill(self, value):
        self[...] = value

    def _read(name):
        def read(self, *args):
            if not _reads_allowed:
                raise HostRead(f"a host read of a device array (shape {self.shape}, {self.dtype})")
            return getattr(np.ndarray, name)(self.view(np.ndarray), *args)
        return read

    __bool__, __int__, __float__, __index__, __complex__, item, tolist = (
        _read("__bool__"), _read("__int__"), _read("__float__"), _read("__index__"), _read("__complex__"), _read("item"), _read("tolist"))

    def get(self) -> np.ndarray:
        return np.array(self.view(np.ndarray))


def _arrays(*trees) -> list:
    found = []
    for t in trees:
        if isinstance(t, np.ndarray):
            found.append(t.view(np.ndarray))
        elif isinstance(t, (list, tuple)):
            found += _arrays(*t)
        elif isinstance(t, dict):
            found += _arrays(*t.values())
    return found


def device(value):
    """NumPy's results as device arrays; everything else (dtypes, shapes, ints) as it is."""
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value).view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(device(v) for v in value)
    return value


def _wrap(f):
    def call(*args, **kwargs):
        return device(f(*args, **kwargs))

    return call


FILLS = ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange", "eye", "linspace")


def _filling(f):
    """An allocation that also writes (a memset or a fill kernel): replayed with its contents."""
    def call(*args, **kwargs):
        out = device(f(*_base(args), **_base(kwargs)))
        if _record is not None:
            dst, value = out.view(np.ndarray), out.view(np.ndarray).copy()
            _record.append(lambda: np.copyto(dst, value))
        return out

    return call


def _asarray(a, dtype=None, order=None):
    """xp.asarray, and with order "C" xp.ascontiguousarray. NumPy does not dispatch these to
    __array_function__, so a copy they make on the device is recorded here."""
    if _record is not None and not isinstance(a, DeviceArray):
        raise CaptureError("a copy from the host inside a stream capture (CuPy refuses it)")
    if not isinstance(a, DeviceArray):  # a copy to the device, as CuPy's: never the host's memory
        return device(np.array(a, dtype=dtype, order=order or "K", copy=True))
    out = np.asarray(_base(a), dtype=dtype, order=order)
    if _record is not None and not _is_view(out, _base(a)):  # a dtype conversion or a compaction on the device
        src, dst = _base(a), out
        _record.append(lambda: _copy_into(dst, src))
    return device(out)


class _Generator:
    def __init__(self, g):
        self.g = g

    def __getattr__(self, name):
        return _wrap(getattr(self.g, name))


class Graph:
    """A captured sequence of operations; launch() replays it."""

    def __init__(self, ops: list):
        self.ops, self.launches = ops, 0

    replays = 0  # launches of every graph, in this process

    def launch(self, stream=None):
        self.launches += 1
        Graph.replays += 1
        for op in self.ops:
            op()


class Stream:
    def __init__(self, non_blocking: bool = False):
        self.non_blocking = non_blocking

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self, mode=None):
        global _record
        assert _record is None, "a capture is already under way"
        _record = []

    def end_capture(self) -> Graph:
        global _record
        ops, _record = _record, None
        while _undo:  # a capture writes nothing: the launches do
            a, before = _undo.pop()
            np.copyto(a, before)
        return Graph(ops)

    def is_capturing(self) -> bool:
        return _record is not None

    def synchronize(self):
        assert _record is None, "a synchronization inside a stream capture"


class MemoryPool:
    def malloc(self, size):
        raise NotImplementedError  # NumPy allocates: only the pool's lifetime matters here

    def free_all_blocks(self):
        pass


class _UsingAllocator:
    def __init__(self, allocator=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_current = Stream()


class _Device:
    """cupy.cuda.Device(): its memory is the host's here."""

    def __init__(self, index=0):
        pass

    @property
    def mem_info(self):
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"], info["MemTotal"]


class _Function(cuda_executor.Function):
    """A kernel of the executor's RawModule: its launches are recorded in a capture, as a CUDA
    graph records a kernel node (device arrays by reference, host scalars by value)."""

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        launch = cuda_executor.Launch(self, grid, block, args, shared_mem)
        _will_write(*(a.view(np.ndarray) for a in launch.written))
        launch()
        if _record is not None:
            _record.append(launch)


class RawModule(cuda_executor.RawModule):
    """cupy.RawModule on the CPU executor (cuda_executor.py): the source compiled with g++ and
    run with CUDA's semantics; device arrays are this stand-in's."""

    def __init__(self, code, options=(), name_expressions=None, seed=0):
        super().__init__(code, options, name_expressions, device_array=DeviceArray, seed=seed)

    def get_function(self, name):
        return _Function(self, name)


class StrictCupy:
    """The `xp` of the stand-in: np's functions, their array results on the "device". With
    `kernels` (the default) it has a RawModule, so backend.fused hands the training loop
    kernels.cuda(), all its CUDA kernels run on the executor, as on a GPU; without, it has none,
    and the array code runs (what CuPy runs for float64, or where no kernel applies). `seed`
    varies the executor's thread and block orders."""

    __name__ = "strict_cupy"

    def __init__(self, kernels: bool = True, seed: int = 0):
        if kernels:
            self.RawModule = functools.partial(RawModule, seed=seed)
    random = types.SimpleNamespace(default_rng=lambda *a, **k: _Generator(np.random.default_rng(*a, **k)))
    lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=_wrap(np.lib.stride_tricks.as_strided)))
    cuda = types.SimpleNamespace(Stream=Stream, MemoryPool=MemoryPool, using_allocator=_UsingAllocator,
                                 get_current_stream=lambda: _current, Device=_Device)
    asarray = staticmethod(_asarray)
    ascontiguousarray = staticmethod(functools.partial(_asarray, order="C"))

    def __getattr__(self, name):
        f = getattr(np, name)
        if name in FILLS:
            return _filling(f)
        return f if isinstance(f, type) or not callable(f) else _wrap(f)
