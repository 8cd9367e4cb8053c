"""What every accelerated implementation is: a layer's forward and backward for one input."""
from __future__ import annotations

from typing import Any


class Implementation:
    """Made by choose.py for one layer and one input: ``forward(*inputs)`` runs instead of the
    layer's reference code and keeps on ``self`` what ``backward(dout)`` needs; ``accepts(layer,
    *inputs)`` says whether this implementation can compute that input at all."""

    name = ""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.cache: Any = None

    @staticmethod
    def accepts(layer: Any, *inputs: Any) -> bool:
        return True
