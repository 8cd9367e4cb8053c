"""Concat: join tensors along the channel axis - how a U-Net's skip connection meets the decoder.

Forward copies the inputs one after the other; backward hands each input its own slice of the
gradient (each output channel came from exactly one input channel, with derivative 1).
"""
from __future__ import annotations

from typing import Any, Tuple

from tinyunet.backend import xp
from tinyunet.nn.module import Module, accelerated


class Concat(Module):
    """forward(a, b, ...) concatenates along ``axis``; backward splits the gradient back apart."""

    def __init__(self, axis: int = 1) -> None:
        self.axis = axis
        self.sizes: Tuple[int, ...] = ()
        self.fast: Any = None

    def forward(self, *inputs: Any) -> Any:
        """inputs: (N, C_i, H, W) each -> (N, sum C_i, H, W)."""
        self.sizes = tuple(t.shape[self.axis] for t in inputs)
        self.fast = accelerated(self, *inputs)     # the CPU acceleration, or None: the reference below
        if self.fast:
            return self.fast.forward(*inputs)
        return xp.concatenate(inputs, axis=self.axis)

    def backward(self, dout: Any) -> Tuple[Any, ...]:
        """dout: (N, sum C_i, H, W) -> one gradient per input (views into dout: no copy)."""
        return self.split(dout)

    def split(self, dout: Any) -> Tuple[Any, ...]:
        """The slices of dout along ``axis`` that belong to each input, in order."""
        grads, start = [], 0
        for size in self.sizes:
            index = [slice(None)] * dout.ndim
            index[self.axis] = slice(start, start + size)
            grads.append(dout[tuple(index)])
            start += size
        return tuple(grads)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"
