"""ConvTranspose2d: the "up-convolution" of the U-Net decoder.

A transposed convolution is the *backward pass of a convolution* used as a forward pass: each input
pixel paints a weighted kh×kw stamp onto a larger output, stamps ``stride`` apart, overlaps summed.
So it reuses the convolution's two channels-last helpers (see conv.py) the other way round, with
x as rows (N*H*W, Cin) and the weight as w2 (Cin, kh*kw*Cout):

    forward:  stamps = x @ w2               (N*H*W, kh*kw*Cout): every pixel's stamp, one product
              then row2im adds the stamps onto the output: one strided add per kernel offset
              (for the U-Net's kernel 2, stride 2 the stamps do not overlap: each output pixel
              gets exactly one)
    backward: drows = im2row(dout)          (N*H*W, kh*kw*Cout): what each stamp touched
              dx = drows @ w2^T,  dweight = x^T @ drows  (sum over the batch inside the product)

Weight layout (in_channels, out_channels, kh, kw), output size (H-1)*stride - 2*padding + kh,
both as in PyTorch. Input and output are NCHW-shaped; the output has channels-last memory.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from tinyunet.backend import xp
from tinyunet.nn.conv import add_channel_vector, channel_sum, im2row, kaiming_uniform, nchw, nhwc, pair, row2im
from tinyunet.nn.module import Module, Parameter
from tinyunet.parallel import copy_images, matmul, transposed_matmul


def conv_transpose2d_naive(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], stride: int = 1,
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

    def _w2(self) -> Any:
        """weight (Cin, Cout, kh, kw) -> (Cin, kh*kw*Cout), the column order of :func:`im2row`."""
        return self.weight.data.transpose(0, 2, 3, 1).reshape(self.in_channels, -1)

    def _tiles(self) -> bool:
        """Kernel = stride and no padding (the U-Net's 2x2, stride 2): the stamps tile the output
        without overlapping, so placing them is a rearrangement - one copy - rather than a sum."""
        return self.kernel_size == (self.stride, self.stride) and self.padding == 0

    def forward(self, x: Any) -> Any:
        """x: (N, Cin, H, W) -> (N, Cout, (H-1)*stride - 2*padding + kh, ...)."""
        kh, kw = self.kernel_size
        n, _, h, w = x.shape
        x_rows = nhwc(x).reshape(n * h * w, self.in_channels)   # a copy only if x is NCHW in memory
        stamps = matmul(x_rows, self._w2())                      # (N*H*W, kh*kw*Cout)
        out_shape = (n, self.output_size(h, 0), self.output_size(w, 1), self.out_channels)
        if min(out_shape[1:3]) < 1:  # PyTorch refuses this too: padding larger than the stamps
            raise ValueError(f"ConvTranspose2d output would be {out_shape[1]}x{out_shape[2]} for a {h}x{w} input "
                             f"(kernel {self.kernel_size}, stride {self.stride}, padding {self.padding})")
        if self._tiles():
            out = xp.empty(out_shape, dtype=stamps.dtype)
            tiles = out.reshape(n, h, kh, w, kw, self.out_channels)  # [n, y, i, x, j] = out[n, y*kh + i, x*kw + j]
            placed = stamps.reshape(n, h, w, kh, kw, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
            copy_images(tiles, placed)
        else:
            out = row2im(stamps, out_shape, kh, kw, self.stride, self.padding)   # (N, Hout, Wout, Cout)
        if self.bias is not None:
            add_channel_vector(out, self.bias.data)
        self.x = x_rows
        return nchw(out)

    def backward(self, dout: Any) -> Any:
        """dout: (N, Cout, Hout, Wout) -> dx: (N, Cin, H, W); accumulates weight/bias grads."""
        kh, kw = self.kernel_size
        x_rows, self.x = self.x, None
        n, _, hout, wout = dout.shape
        dout_nhwc = nhwc(dout)
        h, w = (hout + 2 * self.padding - kh) // self.stride + 1, (wout + 2 * self.padding - kw) // self.stride + 1
        if self._tiles():  # the inverse rearrangement: each stamp's kh*kw pixels of dout, one row per input pixel
            drows = xp.empty((n, h, w, kh, kw, self.out_channels), dtype=dout.dtype)
            copy_images(drows, dout_nhwc.reshape(n, h, kh, w, kw, self.out_channels).transpose(0, 1, 3, 2, 4, 5))
            drows = drows.reshape(n * h * w, -1)
        else:
            drows = im2row(dout_nhwc, kh, kw, self.stride, self.padding)    # (N*H*W, kh*kw*Cout)
        dw2 = transposed_matmul(x_rows, drows)                             # (Cin, kh*kw*Cout)
        self.weight.grad += dw2.reshape(self.in_channels, kh, kw, self.out_channels).transpose(0, 3, 1, 2)
        if self.bias is not None:
            # tiles: from drows, which holds every pixel of dout once, in contiguous memory (in the U-Net
            # dout is a channel slice of the concatenation's gradient, each pixel's channels a separate
            # piece: 32 -> 16 at 64x64, batch 8, 1.0 -> 0.3 ms); overlapping stamps: from dout itself
            pixels = drows.reshape(n, h, -1, self.out_channels) if self._tiles() else dout_nhwc
            self.bias.grad += channel_sum(pixels)
        dx = matmul(drows, self._w2().T)                                 # (N*H*W, Cin)
        return nchw(dx.reshape(n, h, w, self.in_channels))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")
