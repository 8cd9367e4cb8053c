"""ReLU: max(0, x). Its gradient is 1 where the input was positive and 0 elsewhere."""
from __future__ import annotations

from typing import Any

from tinyunet.backend import xp
from tinyunet.nn.module import Module, accelerated


class ReLU(Module):
    def __init__(self) -> None:
        self.out: Any = None
        self.fast: Any = None

    def forward(self, x: Any) -> Any:
        """x: any shape -> same shape."""
        self.fast = accelerated(self, x)     # the CPU acceleration, or None: the reference below
        if self.fast:
            return self.fast.forward(x)
        # keep the *output* for backward: out > 0 is the mask of where x was positive (PyTorch keeps
        # the output too; the next layer may hold on to this same array, and a mask would be one more)
        self.out = xp.maximum(x, 0)
        return self.out

    def backward(self, dout: Any) -> Any:
        """dout: same shape as the output -> dx (0 where the output was 0)."""
        if self.fast:
            return self.fast.backward(dout)
        out, self.out = self.out, None
        return dout * (out > 0)
