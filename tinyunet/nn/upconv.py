"""ConvTranspose2d: the "up-convolution" of the U-Net decoder.

A transposed convolution is the *backward pass of a convolution* used as a forward pass: each input
pixel paints a weighted kh×kw stamp onto a larger output, stamps ``stride`` apart, overlaps summed.
So it reuses the convolution's two helpers the other way round:

    forward:  cols = weight^T @ x_n        then col2im (scatter-add) -> output
    backward: dcols = im2col(dout)          then dx = weight @ dcols,  dweight = sum_n x_n @ dcols_n^T

Weight layout (in_channels, out_channels, kh, kw), output size (H-1)*stride - 2*padding + kh,
both as in PyTorch.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinyunet.backend import xp
from tinyunet.nn.conv import col2im, im2col, kaiming_uniform, pair
from tinyunet.nn.module import Module, Parameter


def conv_transpose2d_naive(x: np.ndarray, weight: np.ndarray, bias, stride: int = 1,
                           padding: int = 0) -> np.ndarray:
    """Reference with explicit loops: every input pixel adds weight[c] * x[n, c, y, x] onto the output.

    x: (N, Cin, H, W), weight: (Cin, Cout, kh, kw) -> (N, Cout, Hout, Wout)
    """
    n, cin, h, w = x.shape
    _, cout, kh, kw = weight.shape
    full = np.zeros((n, cout, (h - 1) * stride + kh, (w - 1) * stride + kw), dtype=x.dtype)
    for b in range(n):
        for c in range(cin):
            for y in range(h):
                for xx in range(w):
                    full[b, :, y * stride:y * stride + kh, xx * stride:xx * stride + kw] += x[b, c, y, xx] * weight[c]
    out = full[:, :, padding:full.shape[2] - padding, padding:full.shape[3] - padding]
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


class ConvTranspose2d(Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: int = 1,
                 padding: int = 0, bias: bool = True) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size)
        self.stride, self.padding = stride, padding
        kh, kw = self.kernel_size
        fan_in = out_channels * kh * kw  # PyTorch computes fan_in from weight.size(1) * kh * kw
        self.weight = Parameter(kaiming_uniform((in_channels, out_channels, kh, kw), fan_in))
        self.bias = Parameter(kaiming_uniform((out_channels,), fan_in)) if bias else None
        self.x: Any = None

    def output_size(self, size: int, axis: int) -> int:
        return (size - 1) * self.stride - 2 * self.padding + self.kernel_size[axis]

    def forward(self, x: Any) -> Any:
        """x: (N, Cin, H, W) -> (N, Cout, (H-1)*stride - 2*padding + kh, ...)."""
        kh, kw = self.kernel_size
        n, _, h, w = x.shape
        out_shape = (n, self.out_channels, self.output_size(h, 0), self.output_size(w, 1))
        w2 = self.weight.data.reshape(self.in_channels, -1)  # (Cin, Cout*kh*kw)
        cols = xp.matmul(w2.T, x.reshape(n, self.in_channels, h * w))
        out = col2im(cols, out_shape, kh, kw, self.stride, self.padding)
        if self.bias is not None:
            out += self.bias.data[:, None, None]
        self.x = x
        return out

    def backward(self, dout: Any) -> Any:
        """dout: (N, Cout, Hout, Wout) -> dx: (N, Cin, H, W); accumulates weight/bias grads."""
        kh, kw = self.kernel_size
        x, self.x = self.x, None
        n, _, h, w = x.shape
        dcols = im2col(dout, kh, kw, self.stride, self.padding)  # (N, Cout*kh*kw, H*W)
        x2 = x.reshape(n, self.in_channels, h * w)
        self.weight.grad += xp.matmul(x2, dcols.transpose(0, 2, 1)).sum(axis=0).reshape(self.weight.data.shape)
        if self.bias is not None:
            self.bias.grad += dout.sum(axis=(0, 2, 3))
        dx = xp.matmul(self.weight.data.reshape(self.in_channels, -1), dcols)
        return dx.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")
