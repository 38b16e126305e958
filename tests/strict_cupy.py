"""A strict CuPy stand-in for CI, which has no GPU: NumPy, with CuPy's rules for what stays on the
device. Reductions and scalar indexing give 0-d device arrays (not host scalars, as NumPy does),
and a device array refuses everything that would read it back to the host in CuPy: bool(),
int(), float(), __index__, .item(), .tolist(). `.get()` is the explicit copy to the host."""

import types

import numpy as np


class HostRead(AssertionError):
    """A device-to-host read (a synchronization on a GPU) where none may be."""


class DeviceArray(np.ndarray):
    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return np.asarray(arr).view(DeviceArray)  # 0-d results stay arrays, as in CuPy

    def __getitem__(self, index):
        out = super().__getitem__(index)
        return out if isinstance(out, np.ndarray) else np.asarray(out).view(DeviceArray)

    def _read(self, *args):
        raise HostRead(f"a host read of a device array (shape {self.shape}, {self.dtype})")

    __bool__ = __int__ = __float__ = __index__ = __complex__ = item = tolist = _read

    def get(self) -> np.ndarray:
        return np.array(self.view(np.ndarray))


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


class _Generator:
    def __init__(self, g):
        self.g = g

    def __getattr__(self, name):
        return _wrap(getattr(self.g, name))


class StrictCupy:
    """The `xp` of the stand-in: np's functions, their array results on the "device"."""

    __name__ = "strict_cupy"  # not "cupy": backend.fused hands it no CUDA kernels, the array code runs
    random = types.SimpleNamespace(default_rng=lambda *a, **k: _Generator(np.random.default_rng(*a, **k)))
    lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=_wrap(np.lib.stride_tricks.as_strided)))

    def __getattr__(self, name):
        f = getattr(np, name)
        return f if isinstance(f, type) or not callable(f) else _wrap(f)
