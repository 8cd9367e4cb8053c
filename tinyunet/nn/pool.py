"""MaxPool2d: keep the largest value of each window; backward routes the gradient to it alone.

The k*k positions of a window are k*k strided *views* of the input (offset (i, j), step ``stride``),
each shaped like the output: view (i, j) holds, for every window, its pixel (i, j). Stacked, they
make the whole layer two reductions (lesson 05):

    forward:   out = max over the views,  argmax = which view (i*k + j) held it, the first on ties
    backward:  view (i, j) of dx receives dout where argmax == i*k + j, 0 elsewhere

Ties matter: after a ReLU whole windows are 0, and the gradient must go to one input, not to all
four; ``argmax`` picks the first, as PyTorch does. Overlapping windows (stride < k) send a pixel the
gradients of every window it won: the views then overlap in dx, and their additions add up.
"""
from __future__ import annotations

from typing import Any, List, Optional

from tinyunet.backend import xp
from tinyunet.nn.conv import conv_output_size
from tinyunet.nn.module import Module, accelerated


class MaxPool2d(Module):
    """Max over kernel_size x kernel_size windows (stride defaults to kernel_size, floor mode)."""

    def __init__(self, kernel_size: int = 2, stride: Optional[int] = None) -> None:
        self.kernel_size = kernel_size
        self.stride = stride or kernel_size
        self.cache: Any = None
        self.fast: Any = None

    def _views(self, x: Any) -> List[Any]:
        """x: (N, C, H, W) -> the k*k strided views (N, C, Hout, Wout), offset (i, j) in order i*k + j."""
        k, s = self.kernel_size, self.stride
        ho, wo = conv_output_size(x.shape[2], k, s, 0), conv_output_size(x.shape[3], k, s, 0)
        return [x[:, :, i:i + s * ho:s, j:j + s * wo:s] for i in range(k) for j in range(k)]

    def forward(self, x: Any) -> Any:
        """x: (N, C, H, W) -> (N, C, Hout, Wout)."""
        self.fast = accelerated(self, x)     # the CPU acceleration, or None: the reference below
        if self.fast:
            return self.fast.forward(x)
        windows = xp.stack(self._views(x))             # (k*k, N, C, Hout, Wout)
        self.cache = (windows.argmax(axis=0), x.shape)   # which view won each window (the first on ties)
        return windows.max(axis=0)

    def backward(self, dout: Any) -> Any:
        """dout: (N, C, Hout, Wout) -> dx: (N, C, H, W)."""
        if self.fast:
            return self.fast.backward(dout)
        argmax, x_shape = self.cache
        self.cache = None
        dx = xp.zeros(x_shape, dtype=dout.dtype)
        for offset, view in enumerate(self._views(dx)):
            view += dout * (argmax == offset)          # writes through the view into dx
        return dx

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
