"""Zero padding for channels-last images, shared by the convolution methods (conv.py, winograd.py)."""
from __future__ import annotations

from typing import Any

from tinyunet.backend import xp
from tinyunet.accel.parallel import map_batch_blocks


def zero_border(a: Any, top: int, bottom: int, left: int, right: int) -> None:
    """Zero a (N, H, W, C) array outside rows [top, bottom) and columns [left, right) (the frame
    around an image copied into it): cheaper than zeroing everything and then copying the image."""
    a[:, :top] = 0
    a[:, bottom:] = 0
    a[:, top:bottom, :left] = 0
    a[:, top:bottom, right:] = 0


def zero_padded(x: Any, p: int) -> Any:
    """x: (N, H, W, C), any memory layout -> (N, H + 2p, W + 2p, C), contiguous channels-last, with
    p zeros on every side. One copy (also turns NCHW memory into channels-last), blocks of images in
    parallel on the CPU (tinyunet/parallel.py)."""
    n, h, w, c = x.shape
    xpad = xp.empty((n, h + 2 * p, w + 2 * p, c), dtype=x.dtype)

    def images(start: int, stop: int) -> None:
        zero_border(xpad[start:stop], p, p + h, p, p + w)
        xpad[start:stop, p:p + h, p:p + w] = x[start:stop]
    map_batch_blocks(images, xpad, passes=2)
    return xpad
