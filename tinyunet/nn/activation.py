"""ReLU: max(0, x). Its gradient is 1 where the input was positive and 0 elsewhere."""
from __future__ import annotations

from typing import Any

from tinyunet import kernels
from tinyunet.backend import xp
from tinyunet.nn.module import Module
from tinyunet.parallel import map_batch_blocks


class ReLU(Module):
    def __init__(self) -> None:
        self.out: Any = None

    def forward(self, x: Any) -> Any:
        """x: any shape -> same shape (and same memory layout)."""
        if kernels.usable(x):   # channels-last batches, Numba installed: the compiled loop (kernels.py)
            out = kernels.relu(x)
        else:
            out = xp.empty_like(x)
            # blocks of images in parallel on the CPU (tinyunet/parallel.py); one call on a GPU
            map_batch_blocks(lambda start, stop: xp.maximum(x[start:stop], 0, out=out[start:stop]), x, passes=2)
        # Keep the *output*, not a mask of x > 0: out > 0 is the same mask, and where the next layer is
        # a conv it keeps this very array for its own backward anyway, so storing it here costs no
        # memory - where a separate boolean mask would add 1/4 of the input (PyTorch's trick). Before a
        # max-pool (which keeps only its argmax) it costs 4x a mask: accepted, to keep one rule.
        self.out = out
        return out

    def backward(self, dout: Any) -> Any:
        """dout: same shape as the output -> dx (0 where the output was 0)."""
        out, self.out = self.out, None
        if kernels.usable(dout, out):   # one pass instead of two (kernels.py)
            return kernels.relu_backward(dout, out)
        dx = xp.empty_like(dout)

        def images(start: int, stop: int) -> None:
            # the mask out > 0 written straight as 0.0/1.0 into dx, then multiplied in place: on one core
            # 1.6 -> 0.9 ms for 8x16x128x128 against dout * (out > 0), whose bool array is converted to
            # float inside the product (on two cores memory speed limits both to ~0.9 ms);
            # xp.where(out > 0, dout, 0) is ~5x slower still
            d = dx[start:stop]
            xp.greater(out[start:stop], 0, out=d)
            d *= dout[start:stop]
        map_batch_blocks(images, dout, passes=4)
        return dx
