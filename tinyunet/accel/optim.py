"""An optimizer's step on every core: the flat buffers (tinyunet/optim.py) cut into chunks.

Every entry of a parameter is updated on its own, so the step is the optimizer's own ``update`` on
chunks of the flat buffers, the chunks in parallel blocks. A chunk is small enough that the dozen
passes of an Adam update over it stay in the core's cache.
"""
from __future__ import annotations

from typing import Any

from tinyunet.accel.implementation import Implementation
from tinyunet.accel.parallel import ELEMENTWISE_WORK, map_row_blocks

CHUNK = 1 << 16          # entries per chunk: 256 KB of float32 per array
_UPDATE_PASSES = 15      # Adam reads or writes each entry's arrays about this many times


class ChunkedStep(Implementation):
    """Optimizer.step's update on chunks of the flat buffers, blocks of chunks on every core."""

    name = "chunks"

    def step(self) -> None:
        opt = self.layer      # the optimizer
        size = opt.data.size

        def some_chunks(first: int, last: int) -> None:
            for k in range(first, last):
                s = slice(k * CHUNK, min((k + 1) * CHUNK, size))
                opt.update(opt.data[s], opt.grad[s], {slot: flat[s] for slot, flat in opt.state.items()})
        map_row_blocks(some_chunks, -(-size // CHUNK), CHUNK * _UPDATE_PASSES * ELEMENTWISE_WORK)
