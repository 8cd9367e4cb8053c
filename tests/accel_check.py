"""Run a layer's reference (acceleration off) and an accelerated implementation on the same input, and
compare: the way llm.c checks each kernel against its CPU reference."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from tinyunet import backend


def step(layer: Any, inputs: Tuple[Any, ...], dout: Any, implementation: Optional[Any] = None) -> Dict[str, Any]:
    """One forward and backward of ``layer`` on ``inputs`` with gradient ``dout``: by its reference
    code (TINYUNET_ACCEL=0's path) when ``implementation`` is None, else by that implementation object
    (made for this layer). -> {"out", "dx" (a tuple, entries None where no gradient), "<param>": grad}."""
    layer.zero_grad()
    if implementation is None:
        before = backend.set_acceleration(False)
        try:
            out = layer.forward(*inputs)
            assert getattr(layer, "fast", None) is None
            dx = layer.backward(dout)
        finally:
            backend.set_acceleration(before)
    else:
        out = implementation.forward(*inputs)
        dx = implementation.backward(dout)
    dx = dx if isinstance(dx, tuple) else (dx,)
    result = {"out": np.array(out), "dx": tuple(None if d is None else np.array(d) for d in dx)}
    result.update({name: p.grad.copy() for name, p in layer.named_parameters()})
    return result


def assert_same(got: Dict[str, Any], expected: Dict[str, Any], rtol: float) -> None:
    """Every array within rtol of the largest entry of the reference's (sums in another order round
    differently; a wrong sum is off by far more). Shapes and dtypes must match exactly."""
    assert set(got) == set(expected)
    for key in expected:
        pairs = zip(got[key], expected[key]) if key == "dx" else [(got[key], expected[key])]
        for mine, theirs in pairs:
            if theirs is None:
                assert mine is None, key
                continue
            assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, (key, mine.shape, theirs.shape,
                                                                               mine.dtype, theirs.dtype)
            scale = max(float(np.abs(theirs).max()), 1e-30)
            error = float(np.abs(mine.astype(np.float64) - theirs).max())
            assert error <= rtol * scale, f"{key}: error {error:.3g} of values up to {scale:.3g}"


def tolerance(dtype: Any) -> float:
    return 2e-5 if dtype == np.float32 else 1e-10


class AcceleratedByTheLayer:
    """``step``'s implementation argument for "the layer's own choice": its forward and backward with the
    acceleration on."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def forward(self, *inputs: Any) -> Any:
        before = backend.set_acceleration(True)
        try:
            out = self.layer.forward(*inputs)
        finally:
            backend.set_acceleration(before)
        assert getattr(self.layer, "fast", None) is not None, "nothing accelerated this layer"
        return out

    def backward(self, dout: Any) -> Any:
        return self.layer.backward(dout)


def channels_last(a: np.ndarray) -> np.ndarray:
    """The same NCHW array with channels-last memory, as the accelerated layers hand each other."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def compare_layer(layer: Any, inputs: Tuple[Any, ...], dout: Any, rtol: Optional[float] = None) -> Dict[str, Any]:
    """The layer with whatever the acceleration picks against its reference code, forward and backward."""
    expected = step(layer, inputs, dout)
    got = step(layer, inputs, dout, AcceleratedByTheLayer(layer))
    assert_same(got, expected, rtol or tolerance(inputs[0].dtype))
    return got
