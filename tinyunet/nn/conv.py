"""Conv2d: a 2-D convolution (cross-correlation, as in PyTorch) as im2col + one matrix product.

Forward (lesson 03). Copy every kh x kw x Cin patch the kernel sees into a column (:func:`im2col`);
then the convolution of image n is one matrix product with the weight as a (Cout, K) matrix:

    cols_n = im2col(x_n)              (K, P)        K = Cin*kh*kw, P = Hout*Wout
    out_n  = W2 @ cols_n + b          (Cout, P)     W2 = weight.reshape(Cout, K)

Backward (lesson 04): with G_n = dL/dout_n (Cout, P), the gradient of a matrix product Y = A @ B is
dA = dY @ B^T and dB = A^T @ dY, so

    dW2  = sum_n G_n @ cols_n^T       the weight is shared by every image: its gradient sums over them
    db   = sum_n sum_p G_n[:, p]      the bias is broadcast to every position: sum over them
    dx_n = col2im(W2^T @ G_n)         each pixel was copied into up to kh*kw columns: add them back

``xp.matmul`` multiplies a (Cout, K) matrix by a stack of (K, P) matrices in one call, so the whole
batch is one product. The columns are kept from forward for backward (kh*kw times the input's
memory, traded for not unfolding the input a second time).
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np

from tinyunet.backend import host_rng, to_device, xp
from tinyunet.nn.module import Module, Parameter, accelerated


def pair(value: Any) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """How many kernel positions fit along an axis: floor((size + 2*padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x: Any, kh: int, kw: int, stride: int, padding: int) -> Any:
    """Unfold every kernel-sized patch into a column: x (N, C, H, W) -> cols (N, C*kh*kw, Hout*Wout).

    Column p = (y, x) holds the patch under output pixel (y, x): ``xpad[n, c, y*stride + i, x*stride + j]``
    at row ``c*kh*kw + i*kw + j``, the order of ``weight.reshape(Cout, C*kh*kw)``'s columns.
    Lesson 03 fills the columns with kh*kw strided slices, one per kernel offset (i, j). Here the same
    numbers come from a *window view* of the padded image: ``sliding_window_view`` gives every kh x kw
    window without copying (an array of shape (N, C, Hp-kh+1, Wp-kw+1, kh, kw) over x's memory),
    ``[::stride]`` keeps the windows the kernel visits, and one copy puts them in column order.
    """
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if padding:
        x = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = xp.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    # (N, C, Ho, Wo, kh, kw) -> (N, C, kh, kw, Ho, Wo): row c*kh*kw + i*kw + j, column y*Wo + x
    return windows.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def col2im(cols: Any, x_shape: Tuple[int, ...], kh: int, kw: int, stride: int, padding: int) -> Any:
    """The adjoint of :func:`im2col`: add every column back onto the patch it came from.

    cols: (N, C*kh*kw, Hout*Wout) -> (N, C, H, W). Overlapping patches *sum* (one strided add per
    kernel offset), which is the chain rule for a pixel that several output pixels used.
    """
    n, c, h, w = x_shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    cols = cols.reshape(n, c, kh, kw, ho, wo)
    out = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            patch_pixels = out[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]   # a view into out
            patch_pixels += cols[:, :, i, j]
    return out[:, :, padding:padding + h, padding:padding + w]   # the padding was not an input


def kaiming_uniform(shape: Tuple[int, ...], fan_in: int) -> Any:
    """PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn on the host."""
    bound = 1.0 / math.sqrt(fan_in)
    return to_device(host_rng().uniform(-bound, bound, size=shape).astype(np.float32))


class Conv2d(Module):
    """2-D convolution over NCHW input; weight (out_channels, in_channels, kh, kw) as in PyTorch."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: int = 1,
                 padding: int = 0, bias: bool = True) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size)
        self.stride, self.padding = stride, padding
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        self.weight = Parameter(kaiming_uniform((out_channels, in_channels, kh, kw), fan_in))
        self.bias = Parameter(kaiming_uniform((out_channels,), fan_in)) if bias else None
        self.cache: Any = None
        self.fast: Any = None
        # False for a layer that reads the data itself: backward then skips the input's gradient and
        # returns None (nobody needs d(loss)/d(image); PyTorch skips it because images do not require grad)
        self.input_grad = True

    def forward(self, x: Any) -> Any:
        """x: (N, Cin, H, W) -> (N, Cout, Hout, Wout)."""
        kh, kw = self.kernel_size
        if x.shape[2] + 2 * self.padding < kh or x.shape[3] + 2 * self.padding < kw:
            raise ValueError(f"Conv2d input {x.shape[2]}x{x.shape[3]} (padding {self.padding}) is smaller "
                             f"than the kernel {self.kernel_size}")
        self.fast = accelerated(self, x)     # the CPU acceleration, or None: the reference below
        if self.fast:
            return self.fast.forward(x)
        n, _, h, w = x.shape
        cols = im2col(x, kh, kw, self.stride, self.padding)                        # (N, K, P)
        out = xp.matmul(self.weight.data.reshape(self.out_channels, -1), cols)     # (N, Cout, P)
        if self.bias is not None:
            out += self.bias.data.reshape(1, -1, 1)
        self.cache = (x.shape, cols)
        ho, wo = conv_output_size(h, kh, self.stride, self.padding), conv_output_size(w, kw, self.stride, self.padding)
        return out.reshape(n, self.out_channels, ho, wo)

    def backward(self, dout: Any) -> Any:
        """dout: (N, Cout, Hout, Wout) -> dx: (N, Cin, H, W); adds into weight.grad and bias.grad."""
        if self.fast:
            return self.fast.backward(dout)
        if self.cache is None:   # the columns are freed by the first backward after a forward
            raise RuntimeError("Conv2d.backward called twice after one forward: where a tensor feeds two "
                               "layers, add their gradients first, then call backward once")
        x_shape, cols = self.cache
        self.cache = None
        g = dout.reshape(dout.shape[0], self.out_channels, -1)                     # G: (N, Cout, P)
        dw2 = xp.matmul(g, cols.transpose(0, 2, 1)).sum(axis=0)                    # sum_n G_n cols_n^T
        self.weight.grad += dw2.reshape(self.weight.data.shape)
        if self.bias is not None:
            self.bias.grad += g.sum(axis=(0, 2))
        if not self.input_grad:
            return None
        dcols = xp.matmul(self.weight.data.reshape(self.out_channels, -1).T, g)    # W2^T G_n: (N, K, P)
        return col2im(dcols, x_shape, *self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")
