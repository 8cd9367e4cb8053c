"""Concat along channels, written channels-last (as every other accelerated layer's output) on every core.

``xp.concatenate`` would return NCHW memory, and the next convolution would have to transpose it.
Backward is the reference's: views into dout, no copy.
"""
from __future__ import annotations

from typing import Any, Tuple

from tinyunet.accel.implementation import Implementation
from tinyunet.accel.parallel import map_batch_blocks
from tinyunet.backend import xp


class ChannelsLastConcat(Implementation):
    """Concat's forward for one set of (N, C_i, H, W) inputs -> (N, sum C_i, H, W), channels-last."""

    name = "channels-last"

    @staticmethod
    def accepts(layer: Any, *inputs: Any) -> bool:
        return layer.axis == 1 and all(t.ndim == 4 for t in inputs)

    def forward(self, *inputs: Any) -> Any:
        n, _, h, w = inputs[0].shape
        out = xp.empty((n, h, w, sum(self.layer.sizes)), dtype=xp.result_type(*inputs))

        def images(start: int, stop: int) -> None:
            first = 0
            for t, size in zip(inputs, self.layer.sizes):
                out[start:stop, :, :, first:first + size] = t[start:stop].transpose(0, 2, 3, 1)
                first += size
        map_batch_blocks(images, out, passes=2)
        return out.transpose(0, 3, 1, 2)

    def backward(self, dout: Any) -> Tuple[Any, ...]:
        return self.layer.split(dout)
