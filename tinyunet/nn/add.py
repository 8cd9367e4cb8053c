"""Add: elementwise sum of tensors (with broadcasting) — how a residual block joins its two paths."""
from __future__ import annotations

from typing import Any, Tuple

from tinyunet.nn.broadcast import unbroadcast
from tinyunet.nn.module import Module


class Add(Module):
    """forward(a, b, ...) = a + b + ...; backward hands the same gradient to every input.

    The derivative of a sum with respect to each term is 1, so every input receives ``dout``
    (summed down to its own shape where it was broadcast, see :func:`unbroadcast`). Inputs of equal
    shape all get the very same ``dout`` array, not copies: like every backward here, the layers
    downstream read their ``dout`` and never modify it in place.
    """

    def __init__(self) -> None:
        self.shapes: Tuple[Tuple[int, ...], ...] = ()

    def forward(self, *inputs: Any) -> Any:
        """inputs: arrays of broadcast-compatible shapes, e.g. (N, C, H, W) and (N, C, H, W) or (1, C, 1, 1)
        -> their broadcast shape."""
        self.shapes = tuple(tuple(t.shape) for t in inputs)
        out = inputs[0]
        for t in inputs[1:]:
            out = out + t
        return out

    def backward(self, dout: Any) -> Tuple[Any, ...]:
        """dout: the output's shape -> one gradient per input, each of that input's shape."""
        return tuple(unbroadcast(dout, shape) for shape in self.shapes)
