"""MaxPool2d: keep the largest value of each window; backward routes the gradient to it alone."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from tinyunet.backend import xp
from tinyunet.nn.conv import conv_output_size
from tinyunet.nn.module import Module
from tinyunet.parallel import map_batch_blocks


def maxpool2d_naive(x: np.ndarray, kernel_size: int, stride: int) -> np.ndarray:
    """Reference max-pool with explicit loops. x: (N, C, H, W) -> (N, C, Hout, Wout)."""
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, kernel_size, stride, 0), conv_output_size(w, kernel_size, stride, 0)
    out = np.empty((n, c, ho, wo), dtype=x.dtype)
    for b in range(n):
        for ch in range(c):
            for y in range(ho):
                for xx in range(wo):
                    window = x[b, ch, y * stride:y * stride + kernel_size, xx * stride:xx * stride + kernel_size]
                    out[b, ch, y, xx] = window.max()
    return out


class MaxPool2d(Module):
    """Max over kernel_size×kernel_size windows (stride defaults to kernel_size, floor mode).

    The k*k window positions are k*k strided *views* of the input (offset (i, j), step ``stride``),
    each shaped like the output, so everything is a handful of whole-array operations:

    - forward: out = elementwise maximum of the k*k views; ``argmax`` = the first offset whose view
      equals out (first on ties, as PyTorch: after a ReLU whole windows are 0, and the gradient must
      go to one input, not to all four). Kept as uint8, 1/16 of the input's float32 memory.
    - backward: dx starts at 0 and each view of dx receives dout where argmax picked that offset;
      overlapping windows (stride < k) add up.

    Works on channels-last memory (x.transpose(0, 2, 3, 1) is free after a conv) and returns the
    output in the same layout.
    """

    def __init__(self, kernel_size: int = 2, stride: Optional[int] = None) -> None:
        self.kernel_size = kernel_size
        self.stride = stride or kernel_size
        self.cache: Any = None

    def _views(self, x: Any):
        """x: (N, H, W, C) -> the k*k strided views (N, Hout, Wout, C), offset (i, j) in order i*k + j."""
        k, s = self.kernel_size, self.stride
        ho, wo = conv_output_size(x.shape[1], k, s, 0), conv_output_size(x.shape[2], k, s, 0)
        return [x[:, i:i + s * ho:s, j:j + s * wo:s] for i in range(k) for j in range(k)]

    def forward(self, x: Any) -> Any:
        """x: (N, C, H, W) -> (N, C, Hout, Wout)."""
        x_nhwc = x.transpose(0, 2, 3, 1)
        k, s = self.kernel_size, self.stride
        n, h, w, c = x_nhwc.shape
        out = xp.empty((n, conv_output_size(h, k, s, 0), conv_output_size(w, k, s, 0), c), dtype=x.dtype)
        argmax = xp.empty(out.shape, dtype=xp.uint8)

        def images(start: int, stop: int) -> None:  # blocks of images in parallel (tinyunet/parallel.py)
            views = self._views(x_nhwc[start:stop])                # NHWC views
            top = out[start:stop]
            top[...] = views[0]
            for v in views[1:]:
                xp.maximum(top, v, out=top)
            # first offset reaching the maximum: walk backwards so earlier offsets overwrite later ones
            best = xp.zeros(top.shape, dtype=xp.uint8)
            for offset in range(len(views) - 1, 0, -1):
                best = xp.where(views[offset] == top, xp.uint8(offset), best)
            argmax[start:stop] = xp.where(views[0] == top, xp.uint8(0), best)
        map_batch_blocks(images, x, passes=3)
        self.cache = (argmax, x.shape, x.dtype)
        return out.transpose(0, 3, 1, 2)

    def backward(self, dout: Any) -> Any:
        """dout: (N, C, Hout, Wout) -> dx: (N, C, H, W)."""
        argmax, (n, c, h, w), dtype = self.cache
        self.cache = None
        dout = dout.transpose(0, 2, 3, 1)
        dx = xp.zeros((n, h, w, c), dtype=dtype)

        def images(start: int, stop: int) -> None:
            for offset, view in enumerate(self._views(dx[start:stop])):
                view += dout[start:stop] * (argmax[start:stop] == offset)  # writes through the view into dx
        map_batch_blocks(images, dx, passes=3)
        return dx.transpose(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
