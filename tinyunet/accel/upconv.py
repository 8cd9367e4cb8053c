"""ConvTranspose2d on channels-last memory: one product for the whole batch, stamps placed by a copy.

With x as rows (N*H*W, Cin) and the weight as w2 (Cin, kh*kw*Cout) (the column order of im2row):

    forward:  stamps = x @ w2               (N*H*W, kh*kw*Cout): every pixel's stamp, one product
              then row2im adds the stamps onto the output, or, where kernel = stride and no padding
              (the U-Net's 2x2, stride 2), the stamps tile the output: placing them is one copy
    backward: drows = im2row(dout)          (N*H*W, kh*kw*Cout): what each stamp touched
              dx = drows @ w2^T,  dweight = x^T @ drows  (the batch summed inside the product)
"""
from __future__ import annotations

from typing import Any

from tinyunet.accel.conv import add_channel_vector, channel_sum, im2row, nchw, nhwc, row2im
from tinyunet.accel.implementation import Implementation
from tinyunet.accel.parallel import copy_images, matmul, transposed_matmul
from tinyunet.backend import xp


class RowsConvTranspose(Implementation):
    """ConvTranspose2d's forward and backward for one input: (N, Cin, H, W) -> (N, Cout, Hout, Wout),
    channels-last memory."""

    name = "rows"

    def _w2(self) -> Any:
        """weight (Cin, Cout, kh, kw) -> (Cin, kh*kw*Cout), the column order of im2row."""
        return self.layer.weight.data.transpose(0, 2, 3, 1).reshape(self.layer.in_channels, -1)

    def _tiles(self) -> bool:
        """Kernel = stride and no padding: the stamps tile the output without overlapping."""
        layer = self.layer
        return layer.kernel_size == (layer.stride, layer.stride) and layer.padding == 0

    def forward(self, x: Any) -> Any:
        layer = self.layer
        kh, kw = layer.kernel_size
        n, _, h, w = x.shape
        cout = layer.out_channels
        x_rows = nhwc(x).reshape(n * h * w, layer.in_channels)   # a copy only if x is NCHW in memory
        stamps = matmul(x_rows, self._w2())                       # (N*H*W, kh*kw*Cout)
        out_shape = (n, layer.output_size(h, 0), layer.output_size(w, 1), cout)
        if self._tiles():
            out = xp.empty(out_shape, dtype=stamps.dtype)
            tiles = out.reshape(n, h, kh, w, kw, cout)  # [n, y, i, x, j] = out[n, y*kh + i, x*kw + j]
            copy_images(tiles, stamps.reshape(n, h, w, kh, kw, cout).transpose(0, 1, 3, 2, 4, 5))
        else:
            out = row2im(stamps, out_shape, kh, kw, layer.stride, layer.padding)   # (N, Hout, Wout, Cout)
        if layer.bias is not None:
            add_channel_vector(out, layer.bias.data)
        self.cache = x_rows
        return nchw(out)

    def backward(self, dout: Any) -> Any:
        layer = self.layer
        kh, kw = layer.kernel_size
        x_rows, self.cache = self.cache, None
        n, cout, hout, wout = dout.shape
        dout_nhwc = nhwc(dout)
        h = (hout + 2 * layer.padding - kh) // layer.stride + 1
        w = (wout + 2 * layer.padding - kw) // layer.stride + 1
        if self._tiles():  # the inverse rearrangement: each stamp's kh*kw pixels of dout, a row per input pixel
            drows = xp.empty((n, h, w, kh, kw, cout), dtype=dout.dtype)
            copy_images(drows, dout_nhwc.reshape(n, h, kh, w, kw, cout).transpose(0, 1, 3, 2, 4, 5))
            drows = drows.reshape(n * h * w, -1)
        else:
            drows = im2row(dout_nhwc, kh, kw, layer.stride, layer.padding)    # (N*H*W, kh*kw*Cout)
        dw2 = transposed_matmul(x_rows, drows)                                # (Cin, kh*kw*Cout)
        layer.weight.grad += dw2.reshape(layer.in_channels, kh, kw, cout).transpose(0, 3, 1, 2)
        if layer.bias is not None:
            # tiles: from drows, which holds every pixel of dout once, in contiguous memory (in the U-Net
            # dout is a channel slice of the concatenation's gradient); overlapping stamps: from dout
            pixels = drows.reshape(n, h, -1, cout) if self._tiles() else dout_nhwc
            layer.bias.grad += channel_sum(pixels)
        dx = matmul(drows, self._w2().T)                                    # (N*H*W, Cin)
        return nchw(dx.reshape(n, h, w, layer.in_channels))
