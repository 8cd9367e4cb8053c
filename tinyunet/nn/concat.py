"""Concat: join tensors along the channel axis — how a U-Net's skip connection meets the decoder."""
from __future__ import annotations

from typing import Any, Tuple

from tinyunet.backend import xp
from tinyunet.nn.module import Module


class Concat(Module):
    """forward(a, b, ...) concatenates along ``axis``; backward splits the gradient back apart."""

    def __init__(self, axis: int = 1) -> None:
        self.axis = axis
        self.sizes: Tuple[int, ...] = ()

    def forward(self, *inputs: Any) -> Any:
        """inputs: (N, C_i, H, W) each -> (N, sum C_i, H, W)."""
        self.sizes = tuple(t.shape[self.axis] for t in inputs)
        return xp.concatenate(inputs, axis=self.axis)

    def backward(self, dout: Any) -> Tuple[Any, ...]:
        """dout: (N, sum C_i, H, W) -> one gradient per input (views into dout: no copy)."""
        bounds = [0]
        for size in self.sizes:
            bounds.append(bounds[-1] + size)
        index = [slice(None)] * dout.ndim
        grads = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            index[self.axis] = slice(start, stop)
            grads.append(dout[tuple(index)])
        return tuple(grads)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"
