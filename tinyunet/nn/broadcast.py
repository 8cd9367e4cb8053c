"""Broadcasting in reverse: the gradient of a broadcast input is summed over the axes it was copied along.

When ``a`` of shape (N, 1, H, W) meets ``b`` of shape (N, C, H, W) in ``a + b``, NumPy uses every
value of ``a`` C times. By the chain rule a value used several times collects the sum of the
gradients of all its uses, so ``da`` is ``dout`` summed over the channel axis, kept as size 1.
"""
from __future__ import annotations

from typing import Any, Tuple


def unbroadcast(grad: Any, shape: Tuple[int, ...]) -> Any:
    """Sum ``grad`` (the broadcast result's shape) down to ``shape`` (an input's shape).

    grad: e.g. (N, C, H, W); shape: e.g. (N, 1, H, W), (C, 1, 1) or () -> an array of ``shape``.
    Leading axes the input did not have are summed away; axes where the input had size 1 are summed
    with keepdims. Returns ``grad`` itself (no copy) when nothing was broadcast.
    """
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    extra = grad.ndim - len(shape)  # NumPy aligns shapes on the right: missing axes are leading
    axes = tuple(range(extra)) + tuple(extra + i for i, size in enumerate(shape)
                                       if size == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=axes).reshape(shape)
