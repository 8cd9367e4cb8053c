"""Concat: forward against an element-by-element copy, split gradients, finite differences, dtypes."""
import numpy as np
import pytest

from tinyunet.nn import naive as ref
from tinyunet.gradcheck import check_module
from tinyunet.nn import Concat

pytestmark = pytest.mark.usefixtures("numpy_backend", "accel_mode")

SHAPES = [
    (1, [(2, 2, 3, 5), (2, 3, 3, 5)]),
    (1, [(3, 1, 5, 3), (3, 4, 5, 3), (3, 2, 5, 3)]),
    (3, [(2, 2, 3, 1), (2, 2, 3, 4)]),
    (0, [(1, 2, 3, 3), (2, 2, 3, 3)]),
]
IDS = [f"axis{a}-{len(s)}inputs" for a, s in SHAPES]


def inputs_for(shapes, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


@pytest.mark.parametrize("axis,shapes", SHAPES, ids=IDS)
def test_forward_matches_reference(axis, shapes):
    xs = inputs_for(shapes)
    np.testing.assert_array_equal(Concat(axis).forward(*xs), ref.concat(xs, axis))


def test_default_axis_is_channels():
    a, b = inputs_for([(2, 2, 3, 3), (2, 1, 3, 3)])
    assert Concat().forward(a, b).shape == (2, 3, 3, 3)


@pytest.mark.parametrize("axis,shapes", SHAPES, ids=IDS)
def test_backward_splits_gradient(axis, shapes):
    xs = inputs_for(shapes)
    cat = Concat(axis)
    out = cat.forward(*xs)
    dout = np.random.default_rng(1).standard_normal(out.shape)
    grads = cat.backward(dout)
    assert isinstance(grads, tuple) and len(grads) == len(xs)
    start = 0
    for x, g in zip(xs, grads):
        assert g.shape == x.shape
        index = [slice(None)] * 4
        index[axis] = slice(start, start + x.shape[axis])
        np.testing.assert_array_equal(g, dout[tuple(index)])
        start += x.shape[axis]


@pytest.mark.parametrize("axis,shapes", SHAPES, ids=IDS)
def test_gradients_match_finite_differences(axis, shapes):
    # concatenation is linear: no kinks
    xs = inputs_for(shapes, seed=2)
    errors = check_module(Concat(axis), *xs)
    assert set(errors) == {f"input{i}" for i in range(len(xs))}
    assert max(errors.values()) <= 1e-6, errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(dtype):
    xs = inputs_for([(2, 2, 3, 5), (2, 3, 3, 5)], dtype=dtype)
    cat = Concat(1)
    out = cat.forward(*xs)
    assert out.dtype == dtype
    assert all(g.dtype == dtype for g in cat.backward(np.ones(out.shape, dtype=dtype)))
