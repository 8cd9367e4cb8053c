"""MaxPool2d on channels-last memory, separably, blocks of images on every core.

The reference (tinyunet/nn/pool.py) stacks the k*k window positions and takes their argmax. Here:

- forward, separably: first the maximum over each window's k columns, row by row (kept: which
  column won), then the maximum of those over the window's k rows. ``argmax`` = i*k + j of the
  winner, the *first* in row-major order on ties, as the reference and PyTorch: each stage only
  moves on to a later column/row when it is strictly greater, and rows come after columns. Kept as
  uint8, 1/8 of the reference's int64. In channels-last memory the second stage compares whole
  image rows (W*C contiguous numbers) instead of C-number pieces, which NumPy runs much faster.
- backward: each view of dx receives dout where argmax picked that offset, 0 elsewhere. When the
  windows tile the input (stride = k, the U-Net's 2x2) the views are disjoint, so each is written
  once; otherwise dx starts at 0 and the views add up (overlapping windows, stride < k).
"""
from __future__ import annotations

from typing import Any, List

from tinyunet.accel.implementation import Implementation
from tinyunet.accel.parallel import map_batch_blocks
from tinyunet.backend import xp
from tinyunet.nn.conv import conv_output_size


def _first_max(views: List[Any], out: Any = None):
    """Elementwise maximum of equally shaped views, and the index of the first view holding it
    (uint8; a later view wins only when strictly greater)."""
    if len(views) == 1:  # a 1-wide window: the view itself is the maximum
        top = xp.empty(views[0].shape, dtype=views[0].dtype) if out is None else out
        top[...] = views[0]
        return top, xp.zeros(top.shape, dtype=xp.uint8)
    top = xp.maximum(views[0], views[1], out=out)
    arg = (views[1] > views[0]).view(xp.uint8)    # bool -> uint8 0/1: a free reinterpretation
    for index in range(2, len(views)):
        arg = xp.where(views[index] > top, xp.uint8(index), arg)
        xp.maximum(top, views[index], out=top)
    return top, arg


class SeparablePool(Implementation):
    """MaxPool2d's forward and backward for one input: (N, C, H, W) -> (N, C, Hout, Wout), channels-last."""

    name = "separable"

    @staticmethod
    def accepts(layer: Any, x: Any) -> bool:
        return layer.kernel_size ** 2 <= 256     # the window's offset i * k + j is kept as a uint8

    def _views(self, x: Any) -> List[Any]:
        """x: (N, H, W, C) -> the k*k strided views (N, Hout, Wout, C), offset (i, j) in order i*k + j."""
        k, s = self.layer.kernel_size, self.layer.stride
        ho, wo = conv_output_size(x.shape[1], k, s, 0), conv_output_size(x.shape[2], k, s, 0)
        return [x[:, i:i + s * ho:s, j:j + s * wo:s] for i in range(k) for j in range(k)]

    def forward(self, x: Any) -> Any:
        x_nhwc = x.transpose(0, 2, 3, 1)
        k, s = self.layer.kernel_size, self.layer.stride
        n, h, w, c = x_nhwc.shape
        out = xp.empty((n, conv_output_size(h, k, s, 0), conv_output_size(w, k, s, 0), c), dtype=x.dtype)
        argmax = xp.empty(out.shape, dtype=xp.uint8)
        rows_used = (out.shape[1] - 1) * s + k               # input rows that some window reads

        def images(start: int, stop: int) -> None:
            xb = x_nhwc[start:stop, :rows_used]
            # stage 1: over the k columns of each window, in every input row -> (n, rows_used, Wout, C)
            row_max, col_arg = _first_max([xb[:, :, j:j + s * out.shape[2]:s] for j in range(k)])
            # stage 2: over the k rows of each window; row_max is contiguous, so rows y = yo*s + i of
            # all windows form one (n, Hout, Wout*C) view with long contiguous rows
            flat = row_max.reshape(stop - start, rows_used, -1)
            col_flat = col_arg.reshape(flat.shape)
            rows = [flat[:, i:i + s * out.shape[1]:s] for i in range(k)]
            top, row_arg = _first_max(rows, out=out[start:stop].reshape(stop - start, out.shape[1], -1))
            col_won = col_flat[:, 0:s * out.shape[1]:s]
            for i in range(1, k):  # the winning column, in the winning row
                col_won = xp.where(row_arg == i, col_flat[:, i:i + s * out.shape[1]:s], col_won)
            argmax[start:stop] = (row_arg * k + col_won).reshape(argmax[start:stop].shape)
        map_batch_blocks(images, x, passes=3)
        self.cache = (argmax, x.shape, x.dtype)
        return out.transpose(0, 3, 1, 2)

    def backward(self, dout: Any) -> Any:
        argmax, (n, c, h, w), _ = self.cache
        self.cache = None
        dtype = dout.dtype                     # as the reference: dx in the gradient's precision
        dout = dout.transpose(0, 2, 3, 1)
        k, s = self.layer.kernel_size, self.layer.stride
        if s != k:  # overlapping windows (or gaps between them): every view adds into zeros
            dx = xp.zeros((n, h, w, c), dtype=dtype)

            def images(start: int, stop: int) -> None:
                for offset, view in enumerate(self._views(dx[start:stop])):
                    view += dout[start:stop] * (argmax[start:stop] == offset)  # writes through the view
        else:  # the windows tile the input: each view of dx is written once, no zeros and no adds
            dx = xp.empty((n, h, w, c), dtype=dtype)
            ho, wo = dout.shape[1:3]

            def images(start: int, stop: int) -> None:
                block = dx[start:stop]
                block[:, ho * k:] = 0          # rows and columns no window covers (floor mode)
                block[:, :ho * k, wo * k:] = 0
                for offset, view in enumerate(self._views(block)):
                    xp.multiply(dout[start:stop], argmax[start:stop] == offset, out=view)
        map_batch_blocks(images, dx, passes=3)
        return dx.transpose(0, 3, 1, 2)
