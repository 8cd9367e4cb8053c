"""Conv2d: a 2-D convolution (cross-correlation, as in PyTorch) as one matrix product per image.

The trick is *im2col*: copy every kh×kw×C patch the kernel sees into a column, so that the
convolution becomes ``weight (Cout, C*kh*kw) @ cols (C*kh*kw, Hout*Wout)``, a matrix product that
BLAS (CPU) or cuBLAS (GPU) runs close to the machine's peak. :func:`conv2d_naive` beside it is the
same maths as six nested loops, for reading and for the tests.

Backward, with ``cols`` kept from forward (memory traded for speed, see ``keep_cols``):

    dweight = sum_n dout_n @ cols_n^T        (Cout, C*kh*kw)
    dcols   = weight^T @ dout_n              (C*kh*kw, Hout*Wout), then col2im scatters the
                                             columns back onto the (padded) input: dx
    dbias   = dout summed over N, H, W
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
    """Unfold kernel-sized patches into columns.

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

    ``keep_cols=True`` keeps the im2col matrix from forward for backward (fast, ~kh*kw times the
    input's memory); ``False`` keeps only the input and unfolds it again in backward.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: int = 1,
                 padding: int = 0, bias: bool = True, keep_cols: bool = True) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size)
        self.stride, self.padding, self.keep_cols = stride, padding, keep_cols
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        self.weight = Parameter(kaiming_uniform((out_channels, in_channels, kh, kw), fan_in))
        self.bias = Parameter(kaiming_uniform((out_channels,), fan_in)) if bias else None
        self.cache: Any = None

    def forward(self, x: Any) -> Any:
        """x: (N, Cin, H, W) -> (N, Cout, Hout, Wout)."""
        kh, kw = self.kernel_size
        n, _, h, w = x.shape
        ho = conv_output_size(h, kh, self.stride, self.padding)
        wo = conv_output_size(w, kw, self.stride, self.padding)
        cols = im2col(x, kh, kw, self.stride, self.padding)
        w2 = self.weight.data.reshape(self.out_channels, -1)
        out = xp.matmul(w2, cols)  # (N, Cout, Hout*Wout): already NCHW, no transpose needed
        if self.bias is not None:
            out += self.bias.data[:, None]
        self.cache = (cols if self.keep_cols else x, x.shape)
        return out.reshape(n, self.out_channels, ho, wo)

    def backward(self, dout: Any) -> Any:
        """dout: (N, Cout, Hout, Wout) -> dx: (N, Cin, H, W); accumulates weight/bias grads."""
        kh, kw = self.kernel_size
        saved, x_shape = self.cache
        cols = saved if self.keep_cols else im2col(saved, kh, kw, self.stride, self.padding)
        n = dout.shape[0]
        d2 = dout.reshape(n, self.out_channels, -1)
        # sum_n dout_n @ cols_n^T as one (Cout, N*L) @ (N*L, K) product would need a transposed copy
        # of cols; a batched matmul reads cols in place and the sum over N is cheap (Cout x K).
        dw = xp.matmul(d2, cols.transpose(0, 2, 1)).sum(axis=0)
        self.weight.grad += dw.reshape(self.weight.data.shape)
        if self.bias is not None:
            self.bias.grad += d2.sum(axis=(0, 2))
        dcols = xp.matmul(self.weight.data.reshape(self.out_channels, -1).T, d2)
        self.cache = None
        return col2im(dcols, x_shape, kh, kw, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")
