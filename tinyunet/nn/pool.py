"""MaxPool2d: keep the largest value of each window; backward routes the gradient to it alone."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from tinyunet.backend import xp
from tinyunet.nn.conv import conv_output_size
from tinyunet.nn.module import Module


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

    Forward stacks the k*k shifted views of the input, (k*k, N, C, Hout, Wout), and takes the argmax
    over the first axis. Backward sends each output gradient to the input position of its argmax
    (the first one on ties, as PyTorch does); overlapping windows (stride < k) add up.
    """

    def __init__(self, kernel_size: int = 2, stride: Optional[int] = None) -> None:
        self.kernel_size = kernel_size
        self.stride = stride or kernel_size
        self.cache: Any = None

    def _views(self, x: Any):
        k, s = self.kernel_size, self.stride
        ho, wo = conv_output_size(x.shape[2], k, s, 0), conv_output_size(x.shape[3], k, s, 0)
        for i in range(k):
            for j in range(k):
                yield (i, j), (slice(None), slice(None), slice(i, i + s * ho, s), slice(j, j + s * wo, s))

    def forward(self, x: Any) -> Any:
        """x: (N, C, H, W) -> (N, C, Hout, Wout)."""
        windows = xp.stack([x[idx] for _, idx in self._views(x)])
        argmax = windows.argmax(axis=0)
        out = xp.take_along_axis(windows, argmax[None], axis=0)[0]
        self.cache = (argmax, x.shape, x.dtype)
        return out

    def backward(self, dout: Any) -> Any:
        """dout: (N, C, Hout, Wout) -> dx: (N, C, H, W)."""
        argmax, shape, dtype = self.cache
        dx = xp.zeros(shape, dtype=dtype)
        for offset, ((i, j), idx) in enumerate(self._views(dx)):
            dx[idx] += xp.where(argmax == offset, dout, 0)
        self.cache = None
        return dx

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
