"""Multiply: elementwise product with broadcasting — how an attention gate scales a skip connection.

For out = a * b the product rule gives da = dout * b and db = dout * a, each summed back to its
input's shape where that input was broadcast: multiplying features (N, C, H, W) by one coefficient
map (N, 1, H, W) uses every coefficient C times, so its gradient is a sum over the channels.
"""
from __future__ import annotations

from typing import Any, Tuple

from tinyunet.nn.broadcast import unbroadcast
from tinyunet.nn.module import Module


class Multiply(Module):
    def __init__(self) -> None:
        self.cache: Any = None

    def forward(self, a: Any, b: Any) -> Any:
        """a, b: broadcast-compatible, e.g. (N, C, H, W) and (N, 1, H, W) -> the broadcast shape."""
        self.cache = (a, b)  # each input's gradient needs the other input
        return a * b

    def backward(self, dout: Any) -> Tuple[Any, Any]:
        """dout: the output's shape -> (da of a's shape, db of b's shape)."""
        a, b = self.cache
        self.cache = None
        return unbroadcast(dout * b, a.shape), unbroadcast(dout * a, b.shape)
