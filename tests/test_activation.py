"""ReLU: forward against a loop reference, gradient (0 at the kink, as PyTorch), finite differences."""
import numpy as np
import pytest

from tinyunet.nn import naive as ref
from tinyunet.gradcheck import check_module
from tinyunet.nn import ReLU

pytestmark = pytest.mark.usefixtures("numpy_backend", "accel_mode")

SHAPES = [(2, 3, 5, 7), (3, 2, 1, 9), (4, 5)]


def away_from_zero(shape, seed):
    """|x| in [0.1, 1]: x +- h (h = 1e-6) never crosses ReLU's kink at 0, where it has no derivative."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape):
    x = np.random.default_rng(0).standard_normal(shape)
    x.flat[0] = 0.0
    np.testing.assert_array_equal(ReLU().forward(x), ref.relu(x))


def test_backward_masks_gradient_and_is_zero_at_zero():
    x = np.array([[-2.0, 0.0, 3.0, -0.0, 1e-300]])
    relu = ReLU()
    relu.forward(x)
    np.testing.assert_array_equal(relu.backward(np.array([[5.0, 6.0, 7.0, 8.0, 9.0]])), [[0.0, 0.0, 7.0, 0.0, 9.0]])


def test_forward_does_not_modify_input():
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5))
    before = x.copy()
    ReLU().forward(x)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_matches_finite_differences(shape):
    # inputs away from the kink at 0 (see away_from_zero)
    errors = check_module(ReLU(), away_from_zero(shape, seed=len(shape)))
    assert errors["input0"] <= 1e-6, errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(dtype):
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 7)).astype(dtype)
    relu = ReLU()
    out = relu.forward(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, ref.relu(x).astype(dtype))
    assert relu.backward(np.ones(x.shape, dtype=dtype)).dtype == dtype
