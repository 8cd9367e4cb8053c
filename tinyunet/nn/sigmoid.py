"""Sigmoid: 1 / (1 + exp(-x)), squashing any number into (0, 1) — an attention gate's coefficients.

Its derivative is expressed by its own output: d sigmoid / dx = s * (1 - s), so forward keeps the
output (not the input) for backward.
"""
from __future__ import annotations

from typing import Any

from tinyunet.backend import xp
from tinyunet.nn.module import Module


class Sigmoid(Module):
    def __init__(self) -> None:
        self.out: Any = None

    def forward(self, x: Any) -> Any:
        """x: any shape -> same shape, values in (0, 1)."""
        # 1 / (1 + exp(-x)) overflows exp for x < -709 (float64) or x < -88 (float32). With
        # e = exp(-|x|) <= 1 nothing can overflow: sigmoid(x) = 1 / (1 + e) for x >= 0 and
        # e / (1 + e) for x < 0 (multiply the top and bottom by exp(x)), both accurate to the last bit.
        e = xp.exp(-xp.abs(x))
        self.out = xp.where(x >= 0, 1, e) / (1 + e)
        return self.out

    def backward(self, dout: Any) -> Any:
        """dout: the output's shape -> dx, the same shape."""
        s, self.out = self.out, None
        return dout * s * (1 - s)
