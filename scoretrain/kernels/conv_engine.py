"""Convolution engines: what computes a conv's output and its two gradients (train.conv_engine).

An engine has one small interface, in the layout the layers hold their arrays (images [N, H, W, C],
channels last; weights [out, kh, kw, in]), for any kernel, stride and zero padding:

    forward(conv, x, w) -> (y, kept)               y [N, Ho, Wo, out]; kept: what backward needs
    backward(conv, d, kept, w, dw, need_dx) -> dx   dL/dw written into dw; dx None unless need_dx
    describe() -> str                               the engine and its library versions (run.h5)
    bn_sums                                         how the conv nets' BatchNorms sum: "rows" or "spans"

`conv` is the layer (nn/layers.py Conv2d: k, stride, pad, and its im2col code).

- `im2col` is the readable reference and the default where no engine is installed: patches and
  a GEMM, the layer's own code (Conv2d.im2col_forward / im2col_backward), on NumPy or CuPy. Its
  BatchNorms sum each channel in row order, the reference's bits (`bn_sums = "rows"`).
- `torch` runs PyTorch's kernels on the same memory, without a copy: an NHWC array is a
  channels-last NCHW tensor (x.permute(0, 3, 1, 2) of its zero-copy view), the [out, kh, kw, in]
  weights a channels-last [out, in, kh, kw] one, and the outputs PyTorch gives for channels-last
  inputs are NHWC arrays again. On the CPU that is oneDNN; CuPy arrays go through DLPack to
  cuDNN, deterministic algorithms only, on CuPy's current stream. Its BatchNorms sum over spans
  of 64 values (`bn_sums = "spans"`: interleaved float64 partial sums, which vectorize where a
  row of 8 or 16 channels does not), the rest of the step at the pace of its convs: other bits
  than im2col's, as its convs give.

The run chooses one (`resolve`) and trains with it (`using`); a network built outside a run
computes with im2col. `auto` takes torch on the CPU where PyTorch is installed. On a GPU it
keeps im2col and cuBLAS, whose step is replayed as CUDA graphs: PyTorch's allocator cannot run
inside a graph that CuPy captures, so the torch engine refuses a capture (step.CapturedStep then
runs the step as it is) and is taken only where named.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from ..errors import ConfigError

CHOICES = ("auto", "im2col", "torch")  # train.conv_engine


class Im2col:
    """The reference: the layer's im2col patches and GEMMs (NumPy or CuPy)."""

    name = "im2col"
    bn_sums = "rows"

    def forward(self, conv, x, w):
        return conv.im2col_forward(x, w)

    def backward(self, conv, d, kept, w, dw, need_dx):
        return conv.im2col_backward(d, kept, w, dw, need_dx)

    def describe(self) -> str:
        return "im2col"

    def session(self):
        return contextlib.nullcontext()


IM2COL = Im2col()


class CaptureRefused(RuntimeError):
    """The torch engine inside a CUDA graph capture (its allocator would hand a graph's memory out
    again): step.CapturedStep runs the step without a graph."""


class Torch:
    """PyTorch's convolution kernels (aten.convolution, aten.convolution_backward) on zero-copy
    views of the arrays: torch.from_numpy on NumPy, DLPack on CuPy (and on the tests' stand-in)."""

    name = "torch"
    bn_sums = "spans"

    def __init__(self, xp, torch):
        self.xp, self.torch = xp, torch
        self.aten = torch.ops.aten
        if xp is not np and torch.cuda.is_available():  # cuDNN: no benchmark-picked, nondeterministic algorithms
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    # --- the views ------------------------------------------------------------------------------

    def _tensor(self, a):
        """An [N, H, W, C] array (or [out, kh, kw, in] weights) as the channels-last NCHW tensor
        of the same memory."""
        t = self.torch.from_numpy(a) if self.xp is np else self.torch.from_dlpack(a)
        return t.permute(0, 3, 1, 2)

    def _array(self, t):
        """A channels-last NCHW tensor as the [N, H, W, C] array of the same memory."""
        t = t.permute(0, 2, 3, 1)
        return t.numpy() if self.xp is np else self.xp.from_dlpack(t)

    @contextlib.contextmanager
    def _on_stream(self):
        """PyTorch's kernels on CuPy's current stream, so that they run in the order of CuPy's;
        never inside CuPy's capture of a CUDA graph."""
        if self.xp is np:
            yield
            return
        stream = self.xp.cuda.get_current_stream()
        if stream.is_capturing():
            raise CaptureRefused("the torch conv engine cannot run inside a CUDA graph capture")
        ptr = getattr(stream, "ptr", None)
        if ptr is None or not self.torch.cuda.is_available():  # the tests' stand-in: its arrays are the host's
            yield
            return
        with self.torch.cuda.stream(self.torch.cuda.ExternalStream(ptr)):
            yield

    # --- the engine -------------------------------------------------------------------------------

    def _on_im2col(self, conv) -> bool:
        """PyTorch 2.13's CPU backward of a 1x1 conv at stride 2 (oneDNN's) crashes the process on
        some shapes (e.g. 25x8x16x16 -> 16 channels): those convs, a residual block's projection
        shortcut (a subsample and a small GEMM), run on im2col."""
        return self.xp is np and conv.k == 1 and conv.stride > 1

    def forward(self, conv, x, w):
        if self._on_im2col(conv):
            return IM2COL.forward(conv, x, w)
        s, p = [conv.stride] * 2, [conv.pad] * 2
        with self._on_stream():
            tx = self._tensor(self.xp.ascontiguousarray(x))
            y = self.aten.convolution(tx, self._tensor(w), None, s, p, [1, 1], False, [0, 0], 1)
            y = y.contiguous(memory_format=self.torch.channels_last)  # (a no-op: channels-last in, channels-last out)
        return self._array(y), tx

    def backward(self, conv, d, tx, w, dw, need_dx):
        if self._on_im2col(conv):
            return IM2COL.backward(conv, d, tx, w, dw, need_dx)
        s, p = [conv.stride] * 2, [conv.pad] * 2
        with self._on_stream():
            td = self._tensor(self.xp.ascontiguousarray(d))
            dx, gw, _ = self.aten.convolution_backward(td, tx, self._tensor(w), None, s, p, [1, 1], False, [0, 0], 1,
                                                       [need_dx, True, False])
            self._tensor(dw).copy_(gw)
            if need_dx:
                dx = dx.contiguous(memory_format=self.torch.channels_last)
        return self._array(dx) if need_dx else None

    def session(self):
        """On the CPU, the BLAS library at one thread while the engine computes: OpenBLAS's idle
        threads spin for a while after each GEMM (the linear layers'), as PyTorch's OpenMP threads
        do after each conv, and on as many cores as threads each side's pass waits for the other's
        spinning (LeNet's step: 0.12 s with OpenBLAS at 2 threads beside the engine, 0.07 s at 1)."""
        if self.xp is not np:
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=1, user_api="blas")

    def describe(self) -> str:
        """'torch 2.13.0+cpu (oneDNN 3.12.0, 2 threads; BLAS at 1 thread beside it)'; on a GPU
        'torch 2.13.0 (cuDNN 91002, deterministic)'."""
        t = self.torch
        if self.xp is not np and t.cuda.is_available():
            return f"torch {t.__version__} (cuDNN {t.backends.cudnn.version()}, deterministic)"
        return f"torch {t.__version__} (oneDNN {_onednn_version(t)}, {t.get_num_threads()} threads; BLAS at 1 thread beside it)"


def _onednn_version(torch) -> str:
    """oneDNN's version as PyTorch's build reports it ('3.12.0'), '?' where it does not say."""
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN v" in line or "oneDNN v" in line:
            return line.split(" v", 1)[1].split()[0]
    return "?"


@functools.cache
def _import_torch():
    """(torch, None), or (None, why not): not installed, or an install that fails to import."""
    try:
        import torch
    except ModuleNotFoundError:
        return None, "PyTorch is not installed"
    except Exception as e:  # a broken install (a missing shared library, say): its own error, in one line
        return None, f"PyTorch fails to import ({e.__class__.__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return torch, None


@functools.cache
def _torch_engine(xp):
    """The torch engine for the array module `xp`, or the reason there is none."""
    torch, why = _import_torch()
    if torch is None:
        return None, why
    if xp is not np and not torch.cuda.is_available():
        return None, f"this PyTorch ({torch.__version__}) has no CUDA device: a GPU run needs a CUDA build of PyTorch"
    if xp is np and not torch.backends.mkldnn.is_available():
        return None, f"this PyTorch ({torch.__version__}) was built without oneDNN"
    return Torch(xp, torch), None


def resolve(name: str, xp):
    """The engine train.conv_engine names, for the array module `xp`: `auto` takes torch on the
    CPU where it is installed (else im2col, and im2col on a GPU); `torch` where it is missing is
    a ConfigError (one line, exit 2) before anything is written."""
    if name == "im2col" or (name == "auto" and xp is not np):
        return IM2COL
    engine, why = _torch_engine(xp)
    if engine is not None:
        return engine
    if name == "auto":
        return IM2COL
    raise ConfigError(f"train.conv_engine: torch: {why}; install scoretrain[torch] (pip install 'scoretrain[torch]'), "
                      "or use train.conv_engine=im2col")


# --- the engine in use ------------------------------------------------------------------------------

_current = IM2COL


def current():
    """The engine the convs compute with now: a run's (`using`), else im2col."""
    return _current


@contextlib.contextmanager
def using(engine):
    """The convs compute with `engine` inside the block (with its settings: Torch.session), and
    with the engine before it after."""
    global _current
    before, _current = _current, engine
    try:
        with engine.session():
            yield engine
    finally:
        _current = before
