"""ReLU: max(0, x). Its gradient is 1 where the input was positive and 0 elsewhere."""
from __future__ import annotations

from typing import Any

from tinyunet.backend import xp
from tinyunet.nn.module import Module


class ReLU(Module):
    def __init__(self) -> None:
        self.mask: Any = None

    def forward(self, x: Any) -> Any:
        """x: any shape -> same shape."""
        self.mask = x > 0  # a boolean mask is 4x smaller than keeping x itself
        return xp.maximum(x, 0)

    def backward(self, dout: Any) -> Any:
        dx = dout * self.mask
        self.mask = None
        return dx
