"""ConvTranspose2d: the "up-convolution" of the U-Net decoder.

A transposed convolution is the *backward pass of a convolution* used as a forward pass (lesson 06):
a convolution's input gradient was ``col2im(W2^T @ G_n)``, and each column of ``W2^T @ G_n`` is the
kernel weighted by one pixel's values - a stamp - that col2im adds onto the output, ``stride`` apart,
overlaps summed. With the weight as W2 = weight.reshape(Cin, Cout*kh*kw) and X_n = x_n as a
(Cin, H*W) matrix:

    forward:   S_n = W2^T @ X_n                   (Cout*kh*kw, H*W): every pixel's stamp
               out_n = col2im(S_n) + b            (Cout, Hout, Wout)
    backward:  dS_n = im2col(dout_n)              im2col is col2im's adjoint: what each stamp touched
               dX_n = W2 @ dS_n                   a plain convolution of dout
               dW2  = sum_n X_n @ dS_n^T,  db = sum of dout over n, y, x

Weight layout (in_channels, out_channels, kh, kw), output size (H-1)*stride - 2*padding + kh, both as
in PyTorch: the same array that is a Conv2d's weight from Cout to Cin channels.
"""
from __future__ import annotations

from typing import Any

from tinyunet.backend import xp
from tinyunet.nn.conv import col2im, im2col, kaiming_uniform, pair
from tinyunet.nn.module import Module, Parameter, accelerated


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
        self.fast: Any = None

    def output_size(self, size: int, axis: int) -> int:
        return (size - 1) * self.stride - 2 * self.padding + self.kernel_size[axis]

    def forward(self, x: Any) -> Any:
        """x: (N, Cin, H, W) -> (N, Cout, (H-1)*stride - 2*padding + kh, (W-1)*stride - 2*padding + kw)."""
        n, _, h, w = x.shape
        out_shape = (n, self.out_channels, self.output_size(h, 0), self.output_size(w, 1))
        if min(out_shape[2:]) < 1:  # PyTorch refuses this too: padding larger than the stamps
            raise ValueError(f"ConvTranspose2d output would be {out_shape[2]}x{out_shape[3]} for a {h}x{w} input "
                             f"(kernel {self.kernel_size}, stride {self.stride}, padding {self.padding})")
        self.fast = accelerated(self, x)     # the CPU acceleration, or None: the reference below
        if self.fast:
            return self.fast.forward(x)
        stamps = xp.matmul(self.weight.data.reshape(self.in_channels, -1).T, x.reshape(n, self.in_channels, h * w))
        out = col2im(stamps, out_shape, *self.kernel_size, self.stride, self.padding)
        if self.bias is not None:
            out += self.bias.data.reshape(1, -1, 1, 1)
        self.x = x
        return out

    def backward(self, dout: Any) -> Any:
        """dout: (N, Cout, Hout, Wout) -> dx: (N, Cin, H, W); adds into weight.grad and bias.grad."""
        if self.fast:
            return self.fast.backward(dout)
        x, self.x = self.x, None
        n, _, h, w = x.shape
        ds = im2col(dout, *self.kernel_size, self.stride, self.padding)          # (N, Cout*kh*kw, H*W)
        x_mat = x.reshape(n, self.in_channels, h * w)                           # X_n: (Cin, H*W)
        self.weight.grad += xp.matmul(x_mat, ds.transpose(0, 2, 1)).sum(axis=0).reshape(self.weight.data.shape)
        if self.bias is not None:
            self.bias.grad += dout.sum(axis=(0, 2, 3))
        return xp.matmul(self.weight.data.reshape(self.in_channels, -1), ds).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")
