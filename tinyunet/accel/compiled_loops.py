"""Compiled loops for BatchNorm and ReLU (optional, with Numba): each pass over memory does all its arithmetic.

NumPy runs one operation per pass over memory. BatchNorm's forward on NumPy reads or writes its
activation about eight times (a sum for the mean, a subtraction, a sum of squares, a multiplication,
an addition, and the tiled per-channel vectors), its backward about seven; ReLU's backward two
(the mask, then the product). The arithmetic is trivial, the passes are the cost: at the U-Net's top
level every pass moves 8 MB. A loop over the elements that does a whole formula per element needs
two passes each way for BatchNorm (the per-channel sums, then the elementwise formula) and one for
ReLU, and that is what this module runs, compiled by Numba (``@njit``, the loops become machine code
with SIMD instructions; ``nogil=True`` lets our threads run them side by side on blocks of images,
tinyunet/parallel.py). The loops read like the maths, one pixel at a time: the naive version and the
fast one are the same code here.

Measured in the standard training step (2 cores, Zen 4, steps alternating with the loops on and off
in one process, 30 pairs: benchmarks/compiled_loops.py): BatchNorm + ReLU 108.3 -> 62.7 ms per step,
the step 8% faster (pair ratio 0.919; other runs 0.914, 0.938); in the benchmark's breakdown
BatchNorm took 1.09x PyTorch's time, ReLU 1.29x (with NumPy passes 1.79x and 1.98x). The convolutions
have compiled kernels of their own (tinyunet/direct_conv.py); ``set_enabled`` switches both.

Where the loops need care: they vectorise over the channel axis only if the compiler knows its
stride. A strided view of a padded buffer, passed as it is, compiles to scalar code (ReLU's backward
was 2x *slower* than NumPy's that way); hence :func:`_pixels`. And a loop that reads and writes many
arrays at once does not vectorise either (Numba cannot promise the compiler that arrays do not
overlap, and the compiler gives up checking): Winograd's input transform as such a loop (16 reads, 16
writes per element) ran 1.6x slower than its NumPy passes. (What makes a convolution fast in compiled
code is something else: sums kept in vector registers, tinyunet/simd.py and direct_conv.py.)

Optional: ``pip install -e '.[fast]'`` installs Numba. The first use compiles the loops (about 4 s
here, once: Numba caches the machine code on disk, next to this file or in its user cache). Without it, on CuPy (a GPU runs NumPy-style
code as fused kernels of its own), for NCHW memory, or with ``TINYUNET_KERNELS=numpy`` in the
environment, the layers run their NumPy passes - the code the lessons teach. Both give the same
numbers up to rounding (tests/test_kernels.py); these loops sum in float64, so their statistics are
if anything more exact.

Arrays here are NCHW-shaped with channels-last memory (what the layers hand each other, see
conv.py): the loops run over (image, row, column, channel), the channel innermost and contiguous.
A convolution's output is a view that skips its padding rows and columns; :func:`_pixels` gives the
loops such an array as a plain C-ordered (N, Hb, Wb, C) array over the same memory, whose first
(H, W) rows and columns are the view, so that the compiler knows the channel stride and vectorises.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

import numpy as np

from tinyunet import backend
from tinyunet.accel.parallel import map_batch_blocks

__all__ = ["available", "set_enabled", "usable", "channel_mean_var", "normalise", "grad_sums",
           "affine_grad", "relu", "relu_backward"]

_enabled = os.environ.get("TINYUNET_KERNELS", "").strip().lower() != "numpy"
_loops: Optional[dict] = None   # name -> compiled function, filled on first use ({} without Numba)


def _compile() -> dict:
    """The compiled loops (Numba compiles each on its first call per dtype and caches it on disk)."""
    try:
        from numba import njit
    except ImportError:
        return {}
    jit = njit(nogil=True, cache=True)

    # Each loop handles images [start, stop) of x: (N, Hb, Wb, C), its first h rows and w columns.
    @jit
    def sums(a, pa, b, pb, h, w, out, start, stop):
        """out[0] = sum(a - pa), out[1] = sum((a - pa) * (b - pb)) per channel, in float64 (pa, pb:
        one value per channel). BatchNorm's statistics with a = b = x and pa = pb = a value of each
        channel (its first pixel): var = E[(x-p)^2] - E[x-p]^2 stays exact when the mean is far from
        0, where E[x^2] - E[x]^2 would cancel. Its backward's with a = dout, b = x - mean, no shift."""
        c = a.shape[3]
        s, q = np.zeros(c), np.zeros(c)
        for n in range(start, stop):
            for i in range(h):
                for j in range(w):
                    for k in range(c):
                        v = np.float64(a[n, i, j, k]) - pa[k]
                        s[k] += v
                        q[k] += v * (b[n, i, j, k] - pb[k])
        out[0], out[1] = s, q

    @jit
    def centre_scale_shift(x, h, w, mean, scale, beta, centered, out, start, stop):
        """centered = x - mean; out = centered * scale + beta (BatchNorm's forward formula)."""
        c = x.shape[3]
        for n in range(start, stop):
            for i in range(h):
                for j in range(w):
                    for k in range(c):
                        v = x[n, i, j, k] - mean[k]
                        centered[n, i, j, k] = v
                        out[n, i, j, k] = v * scale[k] + beta[k]

    @jit
    def affine_of_grad(d, h, w, centered, a, b, shift, dx, start, stop):
        """dx = a * d + b * centered + shift (BatchNorm's input gradient, constants per channel)."""
        c = d.shape[3]
        for n in range(start, stop):
            for i in range(h):
                for j in range(w):
                    for k in range(c):
                        dx[n, i, j, k] = a[k] * d[n, i, j, k] + b[k] * centered[n, i, j, k] + shift[k]

    @jit
    def positive_part(x, h, w, out, start, stop):
        """out = max(x, 0)."""
        for n in range(start, stop):
            for i in range(h):
                for j in range(w):
                    for k in range(x.shape[3]):
                        v = x[n, i, j, k]
                        out[n, i, j, k] = 0 if v <= 0 else v    # NaN stays NaN, as in np.maximum

    @jit
    def grad_where_positive(d, h, w, y, dx, start, stop):
        """dx = d where y > 0, else 0 (one pass: no mask array)."""
        for n in range(start, stop):
            for i in range(h):
                for j in range(w):
                    for k in range(y.shape[3]):
                        dx[n, i, j, k] = d[n, i, j, k] if y[n, i, j, k] > 0 else 0

    return {f.__name__: f for f in (sums, centre_scale_shift, affine_of_grad, positive_part, grad_where_positive)}


def available() -> bool:
    """Whether the compiled loops can run: Numba is installed and they are not switched off."""
    global _loops
    if not _enabled:
        return False
    if _loops is None:
        _loops = _compile()
    return bool(_loops)


def set_enabled(enabled: bool) -> bool:
    """Switch the compiled loops, and direct_conv's kernels, on (where Numba is installed) or off
    (the NumPy passes and BLAS products everywhere). Returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def _pixels(a: Any) -> Optional[Any]:
    """An (N, C, H, W)-shaped array with channels-last memory -> a C-ordered (N, Hb, Wb, C) array over
    the same memory whose [:, :H, :W] is ``a`` (Hb >= H, Wb >= W: a padded buffer's full lines), or
    None if a's memory is not laid out like that (e.g. NCHW). Only [:, :H, :W] is ever read or
    written: for the last image the rest may lie past the end of the buffer."""
    p = a.transpose(0, 2, 3, 1)                      # (N, H, W, C): the memory order
    if p.flags.c_contiguous:
        return p
    n, h, w, c = p.shape
    item = p.itemsize
    pixel = c * item
    step_image, step_line, step_pixel, step_channel = p.strides
    if (c > 1 and step_channel != item) or (w > 1 and step_pixel != pixel):
        return None
    line = step_line if h > 1 else w * pixel          # (the stride of an axis of length 1 means nothing)
    image = step_image if n > 1 else h * line
    if line % pixel or line < w * pixel or image % line or image < h * line:
        return None
    return np.lib.stride_tricks.as_strided(p, shape=(n, image // line, line // pixel, c),
                                           strides=(image, line, pixel, item))


def usable(*arrays: Any) -> bool:
    """Whether the compiled loops take these arrays: NumPy float32/float64 arrays of 4 dimensions
    with channels-last memory (see :func:`_pixels`), on the NumPy backend, Numba installed."""
    return (backend.name() == "numpy" and available()
            and all(isinstance(a, np.ndarray) and a.ndim == 4 and a.dtype in (np.float32, np.float64)
                    and a.shape[0] and _pixels(a) is not None for a in arrays))


def _run(loop: str, first: Any, passes: int, args: Callable[[int, int], Tuple]) -> None:
    """Run a loop on blocks of images of ``first`` in parallel; ``args(start, stop)`` gives a block's arguments."""
    fn = _loops[loop]
    map_batch_blocks(lambda start, stop: fn(*args(start, stop)), first, passes=passes)


def _sums(a: Any, pa: Any, b: Any, pb: Any) -> Tuple[Any, Any]:
    """Per-channel sum(a - pa) and sum((a - pa) * (b - pb)), float64, over blocks of images in
    parallel, the blocks' sums added in block order (so the bits do not depend on the number of
    threads). a: (N, C, H, W); b: its (N, Hb, Wb, C) pixels; pa, pb: (C,)."""
    fn, pixels, (_, c, h, w) = _loops["sums"], _pixels(a), a.shape

    def block(start: int, stop: int) -> Any:
        out = np.empty((2, c))
        fn(pixels, pa, b, pb, h, w, out, start, stop)
        return out
    total = sum(map_batch_blocks(block, a, passes=2))
    return total[0], total[1]


def _channels_last(shape: Tuple[int, ...], dtype: Any) -> Any:
    """A new (N, H, W, C) array for an (N, C, H, W) shape."""
    n, c, h, w = shape
    return np.empty((n, h, w, c), dtype=dtype)


def _nchw(a: Any) -> Any:
    return a.transpose(0, 3, 1, 2)


def channel_mean_var(x: Any) -> Tuple[Any, Any]:
    """Per-channel mean and (biased) variance of x over N, H and W, as float64. x: (N, C, H, W) -> (C,), (C,)."""
    n, _, h, w = x.shape
    pivot = x[0, :, 0, 0].astype(np.float64)
    s, q = _sums(x, pivot, _pixels(x), pivot)
    m = n * h * w
    return pivot + s / m, np.maximum(q / m - (s / m) ** 2, 0.0)


def normalise(x: Any, mean: Any, scale: Any, beta: Any) -> Tuple[Any, Any]:
    """x: (N, C, H, W); mean, scale, beta: (C,) -> centered = x - mean, out = centered * scale + beta,
    both (N, H, W, C) arrays (channels-last, contiguous)."""
    px, (_, _, h, w) = _pixels(x), x.shape
    mean, scale, beta = (np.asarray(v, dtype=x.dtype) for v in (mean, scale, beta))
    centered, out = _channels_last(x.shape, x.dtype), _channels_last(x.shape, x.dtype)
    _run("centre_scale_shift", x, 3, lambda start, stop: (px, h, w, mean, scale, beta, centered, out, start, stop))
    return centered, out


def grad_sums(dout: Any, centered: Any) -> Tuple[Any, Any]:
    """dout: (N, C, H, W), centered: (N, H, W, C) -> per-channel sum(dout) and sum(dout * centered), float64."""
    zero = np.zeros(dout.shape[1])
    return _sums(dout, zero, centered, zero)


def affine_grad(dout: Any, centered: Any, a: Any, b: Any, shift: Any) -> Any:
    """dx = a * dout + b * centered + shift, per-channel a, b, shift: (C,). dout: (N, C, H, W),
    centered: (N, H, W, C) -> dx: (N, C, H, W) (channels-last memory)."""
    pd, (_, _, h, w) = _pixels(dout), dout.shape
    a, b, shift = (np.asarray(v, dtype=dout.dtype) for v in (a, b, shift))
    dx = _channels_last(dout.shape, dout.dtype)
    _run("affine_of_grad", dout, 3, lambda start, stop: (pd, h, w, centered, a, b, shift, dx, start, stop))
    return _nchw(dx)


def relu(x: Any) -> Any:
    """max(x, 0). x: (N, C, H, W) -> (N, C, H, W) (channels-last memory)."""
    px, (_, _, h, w) = _pixels(x), x.shape
    out = _channels_last(x.shape, x.dtype)
    _run("positive_part", x, 2, lambda start, stop: (px, h, w, out, start, stop))
    return _nchw(out)


def relu_backward(dout: Any, out: Any) -> Any:
    """dout where out > 0, else 0. dout, out: (N, C, H, W) -> dx: (N, C, H, W) (channels-last memory)."""
    pd, po, (_, _, h, w) = _pixels(dout), _pixels(out), dout.shape
    dx = _channels_last(dout.shape, dout.dtype)
    _run("grad_where_positive", dout, 3, lambda start, stop: (pd, h, w, po, dx, start, stop))
    return _nchw(dx)
