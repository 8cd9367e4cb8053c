"""ReLU on every core: NumPy passes on blocks of images, or one compiled loop per pass (Numba).

The reference (tinyunet/nn/activation.py) is ``xp.maximum(x, 0)`` and ``dout * (out > 0)``. Here the
mask is written straight as 0.0/1.0 into dx and multiplied in place (no boolean temporary converted
inside the product), on blocks of images in parallel; with Numba, each way is one compiled pass
(compiled_loops.py). Both keep the output for backward, as the reference does.
"""
from __future__ import annotations

from typing import Any

from tinyunet.accel import compiled_loops
from tinyunet.accel.implementation import Implementation
from tinyunet.accel.parallel import map_batch_blocks
from tinyunet.backend import xp


def _maximum_zero(x: Any) -> Any:
    out = xp.empty_like(x)   # keeps x's memory layout
    map_batch_blocks(lambda start, stop: xp.maximum(x[start:stop], 0, out=out[start:stop]), x, passes=2)
    return out


def _grad_where_positive(dout: Any, out: Any) -> Any:
    dx = xp.empty_like(dout)

    def images(start: int, stop: int) -> None:
        d = dx[start:stop]
        xp.greater(out[start:stop], 0, out=d)   # the mask as 0.0/1.0, then multiplied in place
        d *= dout[start:stop]
    map_batch_blocks(images, dout, passes=4)
    return dx


class BlockedReLU(Implementation):
    """ReLU's forward and backward for one input: NumPy passes on blocks of images."""

    name = "blocks"

    def forward(self, x: Any) -> Any:
        self.cache = _maximum_zero(x)
        return self.cache

    def backward(self, dout: Any) -> Any:
        out, self.cache = self.cache, None
        return _grad_where_positive(dout, out)


class CompiledReLU(BlockedReLU):
    """ReLU as compiled loops: channels-last 4-D float arrays (compiled_loops.usable), one pass each
    way; a gradient in another memory layout takes the NumPy passes."""

    name = "compiled"

    @staticmethod
    def accepts(layer: Any, x: Any) -> bool:
        return compiled_loops.usable(x)

    def forward(self, x: Any) -> Any:
        self.cache = compiled_loops.relu(x)
        return self.cache

    def backward(self, dout: Any) -> Any:
        out, self.cache = self.cache, None
        if compiled_loops.usable(dout, out):
            return compiled_loops.relu_backward(dout, out)
        return _grad_where_positive(dout, out)
