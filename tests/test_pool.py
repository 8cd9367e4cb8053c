"""MaxPool2d: forward and gradient routing against loop references, finite differences, dtypes."""
import numpy as np
import pytest

from tinyunet.nn import naive as ref
from tinyunet.gradcheck import check_module
from tinyunet.nn import MaxPool2d

pytestmark = pytest.mark.usefixtures("numpy_backend", "accel_mode")

# (kernel, stride) with stride None = kernel (PyTorch default); overlapping (s < k) and gapped (s > k) too
CASES = [(1, None), (2, None), (3, None), (2, 1), (3, 1), (3, 2), (2, 3), (5, 2)]
IDS = [f"k{k}-s{s}" for k, s in CASES]


def distinct_values(shape, seed):
    """A shuffled grid of values 0.01 apart: no two entries tie, and every gap is 1e4 times the
    finite-difference step h = 1e-6, so x +- h never changes which entry is a window's maximum
    (max-pool is not differentiable at ties)."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 - 0.5).astype(np.float64)


@pytest.mark.parametrize("k,s", CASES, ids=IDS)
def test_forward_matches_loop_reference(k, s):
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 9))
    pool = MaxPool2d(k, s)
    out = pool.forward(x)
    expected, _ = ref.maxpool2d(x, k, s or k)
    assert out.shape == expected.shape  # floor mode: a partial window at the border is dropped
    np.testing.assert_array_equal(out, expected)


def test_output_size_is_floor_mode():
    assert MaxPool2d(2).forward(np.zeros((1, 1, 7, 9))).shape == (1, 1, 3, 4)
    assert MaxPool2d(3, 2).forward(np.zeros((2, 2, 8, 5))).shape == (2, 2, 3, 2)


@pytest.mark.parametrize("k,s", CASES, ids=IDS)
def test_backward_routes_gradient_like_reference(k, s):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 9))
    pool = MaxPool2d(k, s)
    out = pool.forward(x)
    dout = rng.standard_normal(out.shape)
    np.testing.assert_allclose(pool.backward(dout), ref.maxpool2d_backward(x, dout, k, s or k), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k,s", [(2, None), (3, 1), (2, 1), (3, None), (3, 2), (1, None)])
def test_ties_send_gradient_to_first_maximum(k, s):
    # lots of ties: values in {0, 1, 2}; the first maximum in row-major order gets the gradient (PyTorch)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 3, (2, 2, 6, 7)).astype(np.float64)
    pool = MaxPool2d(k, s)
    out = pool.forward(x)
    dout = rng.standard_normal(out.shape)
    np.testing.assert_allclose(pool.backward(dout), ref.maxpool2d_backward(x, dout, k, s or k), rtol=1e-12, atol=1e-15)


def test_tie_rule_by_hand():
    x = np.array([[[[5.0, 5.0], [5.0, 5.0]]]])
    pool = MaxPool2d(2)
    pool.forward(x)
    np.testing.assert_array_equal(pool.backward(np.array([[[[3.0]]]])), [[[[3.0, 0.0], [0.0, 0.0]]]])
    x = np.array([[[[1.0, 4.0], [4.0, 2.0]]]])
    pool.forward(x)
    np.testing.assert_array_equal(pool.backward(np.array([[[[3.0]]]])), [[[[0.0, 3.0], [0.0, 0.0]]]])


@pytest.mark.parametrize("k,s", CASES, ids=IDS)
def test_gradient_matches_finite_differences(k, s):
    # inputs away from ties (see distinct_values): max-pool is only differentiable there
    x = distinct_values((2, 2, 7, 6), seed=k * 10 + (s or 0))
    errors = check_module(MaxPool2d(k, s), x)
    assert set(errors) == {"input0"}
    assert errors["input0"] <= 1e-6, errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(dtype):
    x = np.random.default_rng(4).standard_normal((2, 3, 7, 9)).astype(dtype)
    pool = MaxPool2d(2)
    out = pool.forward(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, ref.maxpool2d(x, 2, 2)[0].astype(dtype))
    assert pool.backward(np.ones(out.shape, dtype=dtype)).dtype == dtype


def test_has_no_parameters():
    assert MaxPool2d(2).parameters() == []
