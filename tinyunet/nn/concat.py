"""Concat: join tensors along the channel axis — how a U-Net's skip connection meets the decoder."""
from __future__ import annotations

from typing import Any, Tuple

from tinyunet.backend import xp
from tinyunet.nn.module import Module
from tinyunet.parallel import map_batch_blocks


class Concat(Module):
    """forward(a, b, ...) concatenates along ``axis``; backward splits the gradient back apart."""

    def __init__(self, axis: int = 1) -> None:
        self.axis = axis
        self.sizes: Tuple[int, ...] = ()

    def forward(self, *inputs: Any) -> Any:
        """inputs: (N, C_i, H, W) each -> (N, sum C_i, H, W)."""
        self.sizes = tuple(t.shape[self.axis] for t in inputs)
        if self.axis != 1 or inputs[0].ndim != 4:
            return xp.concatenate(inputs, axis=self.axis)
        # channels of an image: write them channels-last (conv.py), like every other layer's output;
        # xp.concatenate would return NCHW memory, and the next conv would have to transpose it
        n, _, h, w = inputs[0].shape
        out = xp.empty((n, h, w, sum(self.sizes)), dtype=xp.result_type(*inputs))

        def images(start: int, stop: int) -> None:  # blocks of images in parallel (tinyunet/parallel.py)
            first = 0
            for t, size in zip(inputs, self.sizes):
                out[start:stop, :, :, first:first + size] = t[start:stop].transpose(0, 2, 3, 1)
                first += size
        map_batch_blocks(images, out, passes=2)
        return out.transpose(0, 3, 1, 2)

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
