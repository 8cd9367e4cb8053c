"""Conv2d: a 2-D convolution (cross-correlation, as in PyTorch) as one big matrix product.

The trick is to copy every kh×kw×C patch the kernel sees into one row (or column) of a matrix, so
that the convolution becomes a single matrix product that BLAS (CPU) or cuBLAS (GPU) runs close to
the machine's peak. Two layouts of that matrix live here:

- :func:`im2col` / :func:`col2im`, the textbook NCHW form: cols (N, C*kh*kw, Hout*Wout) and
  ``out_n = weight (Cout, C*kh*kw) @ cols_n``. Easy to read (it matches ``weight.reshape(Cout, -1)``
  directly), used by the lessons and tests.
- :func:`im2row` / :func:`row2im`, the channels-last form the layers run: rows (N*Hout*Wout, kh*kw*C)
  and ``out = rows @ weight_t`` with ``weight_t`` (kh*kw*C, Cout). Why: the im2col form is N small
  products with only Cout rows each (16 rows for the first U-Net level), and BLAS is slow on such
  thin matrices (measured 3-20 GFLOP/s here, against 100+ for a square product). In the row form
  the whole batch is ONE product whose long side is N*Hout*Wout, and the result (N, Hout, Wout, Cout)
  is already the output in channels-last memory, so no transpose is needed either. Each patch row is
  also copied as runs of C contiguous numbers, which is cheaper than im2col's scattered copies.

:func:`conv2d_naive` is the same maths as six nested loops, for reading and for the tests.

Arrays stay NCHW in *shape* everywhere (the public convention). A layer may hand back an NCHW-shaped
*view* of channels-last memory (``out.transpose(0, 3, 1, 2)``, no copy); the next conv's
``x.transpose(0, 2, 3, 1)`` is then free, and every elementwise op in between (BatchNorm, ReLU) keeps
the memory order of its input. That is PyTorch's "channels_last memory format": the same tensor,
only the order of the numbers in memory differs, so results never depend on it.

Backward, with M = N*Hout*Wout rows, d2 = dout as (M, Cout):

    dweight_t = rows^T @ d2                   (kh*kw*C, Cout): one product, sum over the batch included
    dbias     = d2 summed over its M rows
    dx        = for stride 1, a convolution of dout with the kernel flipped in space and its
                channel axes swapped, padding kh-1-padding ("full" correlation): another im2row +
                one product, and no scatter-add;
                otherwise drows = d2 @ weight_t^T, then row2im adds each row back onto its patch.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np

from tinyunet.backend import host_rng, to_device, xp
from tinyunet.nn.module import Module, Parameter


def pair(value: Any) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x: Any, kh: int, kw: int, stride: int, padding: int) -> Any:
    """Unfold kernel-sized patches into columns (the textbook NCHW layout; lessons and tests).

    x: (N, C, H, W) -> cols: (N, C*kh*kw, Hout*Wout), row index ``c*kh*kw + i*kw + j``,
    matching ``weight.reshape(Cout, C*kh*kw)``. One strided copy per kernel offset (i, j):
    kh*kw vectorised copies, no loop over pixels or images.
    """
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if padding:
        x = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = xp.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    return cols.reshape(n, c * kh * kw, ho * wo)


def col2im(cols: Any, x_shape: Tuple[int, ...], kh: int, kw: int, stride: int, padding: int) -> Any:
    """The adjoint of :func:`im2col`: add every column back where its patch came from.

    cols: (N, C*kh*kw, Hout*Wout) -> (N, C, H, W). Overlapping patches *sum*, which is exactly the
    chain rule for an input pixel used by several output pixels.
    """
    n, c, h, w = x_shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    cols = cols.reshape(n, c, kh, kw, ho, wo)
    out = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += cols[:, :, i, j]
    if padding:
        out = out[:, :, padding:padding + h, padding:padding + w]
    return out


def nhwc(x: Any) -> Any:
    """(N, C, H, W) -> the same numbers as (N, H, W, C): a view, free when x is channels-last in memory."""
    return x.transpose(0, 2, 3, 1)


def nchw(x: Any) -> Any:
    """(N, H, W, C) -> (N, C, H, W): a view (channels-last memory, NCHW shape), no copy."""
    return x.transpose(0, 3, 1, 2)


def im2row(x: Any, kh: int, kw: int, stride: int, padding: int) -> Any:
    """Unfold patches into rows, channels-last: the layout the layers use (see the module docstring).

    x: (N, H, W, C) -> rows: (N*Hout*Wout, kh*kw*C), column index ``(i*kw + j)*C + c``, matching
    ``weight.transpose(2, 3, 1, 0).reshape(kh*kw*C, Cout)``. The padded border is written as zeros
    once; then one strided copy per kernel offset (i, j), each moving runs of C contiguous numbers.
    """
    n, h, w, c = x.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if padding:
        # zeros + one copy (instead of xp.pad) also turns an NCHW-memory x into contiguous NHWC
        xpad = xp.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=x.dtype)
        xpad[:, padding:padding + h, padding:padding + w] = x
        x = xpad
    if kh == kw == 1 and stride == 1:
        return xp.ascontiguousarray(x).reshape(n * h * w, c)  # a 1x1 conv needs no unfolding
    rows = xp.empty((n, ho, wo, kh, kw, c), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            rows[:, :, :, i, j] = x[:, i:i + stride * ho:stride, j:j + stride * wo:stride]
    return rows.reshape(n * ho * wo, kh * kw * c)


def row2im(rows: Any, x_shape: Tuple[int, ...], kh: int, kw: int, stride: int, padding: int) -> Any:
    """The adjoint of :func:`im2row`: add every row back onto the patch it came from.

    rows: (N*Hout*Wout, kh*kw*C) -> (N, H, W, C) with x_shape = (N, H, W, C). Overlaps *sum*.
    """
    n, h, w, c = x_shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    rows = rows.reshape(n, ho, wo, kh, kw, c)
    out = xp.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=rows.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + stride * ho:stride, j:j + stride * wo:stride] += rows[:, :, :, i, j]
    if padding:
        out = out[:, padding:padding + h, padding:padding + w]
    return out


def conv2d_naive(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], stride: int = 1,
                 padding: int = 0) -> np.ndarray:
    """Reference convolution with explicit loops (slow; for reading and testing only).

    x: (N, C, H, W), weight: (Cout, C, kh, kw), bias: (Cout,) or None -> (N, Cout, Hout, Wout)
    out[n, o, y, x] = bias[o] + sum_{c,i,j} weight[o, c, i, j] * xpad[n, c, y*stride + i, x*stride + j]
    """
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.zeros((n, cout, ho, wo), dtype=x.dtype)
    for b in range(n):
        for o in range(cout):
            for y in range(ho):
                for xx in range(wo):
                    patch = xpad[b, :, y * stride:y * stride + kh, xx * stride:xx * stride + kw]
                    out[b, o, y, xx] = np.sum(patch * weight[o]) + (bias[o] if bias is not None else 0)
    return out


def kaiming_uniform(shape: Tuple[int, ...], fan_in: int) -> Any:
    """PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn on the host."""
    bound = 1.0 / math.sqrt(fan_in)
    return to_device(host_rng().uniform(-bound, bound, size=shape).astype(np.float32))


class Conv2d(Module):
    """2-D convolution over NCHW input; weight (out_channels, in_channels, kh, kw) as in PyTorch.

    Runs as ``im2row(x) @ weight_t``, one matrix product for the whole batch (module docstring).
    The output is NCHW-shaped with channels-last memory.

    ``keep_cols=True`` keeps the unfolded rows from forward for backward (saves one im2row, but
    holds ~kh*kw times the input's memory until backward); ``False`` (the default) keeps only the
    input, which the network holds anyway, and unfolds it again in backward.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: int = 1,
                 padding: int = 0, bias: bool = True, keep_cols: bool = False) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size)
        self.stride, self.padding, self.keep_cols = stride, padding, keep_cols
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        self.weight = Parameter(kaiming_uniform((out_channels, in_channels, kh, kw), fan_in))
        self.bias = Parameter(kaiming_uniform((out_channels,), fan_in)) if bias else None
        self.cache: Any = None

    def _weight_t(self) -> Any:
        """weight (Cout, C, kh, kw) -> (kh*kw*C, Cout), the row order of :func:`im2row`."""
        return self.weight.data.transpose(2, 3, 1, 0).reshape(-1, self.out_channels)

    def forward(self, x: Any) -> Any:
        """x: (N, Cin, H, W) -> (N, Cout, Hout, Wout) (channels-last memory)."""
        kh, kw = self.kernel_size
        n, _, h, w = x.shape
        ho = conv_output_size(h, kh, self.stride, self.padding)
        wo = conv_output_size(w, kw, self.stride, self.padding)
        rows = im2row(nhwc(x), kh, kw, self.stride, self.padding)   # (N*Ho*Wo, kh*kw*Cin)
        out = xp.matmul(rows, self._weight_t())                     # (N*Ho*Wo, Cout)
        if self.bias is not None:
            out += self.bias.data                                   # broadcasts over the last axis
        self.cache = (rows if self.keep_cols else x, x.shape)
        return nchw(out.reshape(n, ho, wo, self.out_channels))

    def backward(self, dout: Any) -> Any:
        """dout: (N, Cout, Hout, Wout) -> dx: (N, Cin, H, W); accumulates weight/bias grads."""
        kh, kw = self.kernel_size
        saved, x_shape = self.cache
        self.cache = None
        n, cin, h, w = x_shape
        rows = saved if self.keep_cols else im2row(nhwc(saved), kh, kw, self.stride, self.padding)
        dout_nhwc = nhwc(dout)                                      # free if dout is channels-last
        d2 = dout_nhwc.reshape(-1, self.out_channels)               # (N*Ho*Wo, Cout)
        # dweight: the sum over the batch is inside the product (the long, inner dimension)
        dw_t = xp.matmul(rows.T, d2)                                # (kh*kw*Cin, Cout)
        del rows
        self.weight.grad += dw_t.reshape(kh, kw, cin, self.out_channels).transpose(3, 2, 0, 1)
        if self.bias is not None:
            self.bias.grad += d2.sum(axis=0)
        if self.stride == 1 and self.padding <= kh - 1 and self.padding <= kw - 1 and kh == kw:
            # dx[y, x, c] = sum_{i,j,o} dout[y - i + p, x - j + p, o] * weight[o, c, i, j]: a "full"
            # correlation of dout with the kernel flipped in space and in/out channels swapped.
            # One im2row + one product; no scatter-add over overlapping patches.
            flipped = self.weight.data[:, :, ::-1, ::-1]                    # (Cout, Cin, kh, kw)
            w_back = flipped.transpose(2, 3, 0, 1).reshape(-1, cin)         # (kh*kw*Cout, Cin)
            drows = im2row(dout_nhwc, kh, kw, 1, kh - 1 - self.padding)     # (N*H*W, kh*kw*Cout)
            dx = xp.matmul(drows, w_back).reshape(n, h, w, cin)
        else:
            drows = xp.matmul(d2, self._weight_t().T)                       # (N*Ho*Wo, kh*kw*Cin)
            dx = row2im(drows, (n, h, w, cin), kh, kw, self.stride, self.padding)
        return nchw(dx)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")
