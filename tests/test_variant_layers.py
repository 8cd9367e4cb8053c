"""Layers of the U-Net variants — Sigmoid, Add, Multiply, Upsample (and the unbroadcast helper):
forward and backward against loop references, finite differences, dtypes, and the strict CuPy stand-in."""
import warnings

import numpy as np
import pytest

from tinyunet.nn import naive as ref
from tinyunet.gradcheck import check_module
from tinyunet.nn import Add, Multiply, Sigmoid, Upsample
from tinyunet.nn.broadcast import unbroadcast

pytestmark = pytest.mark.usefixtures("numpy_backend", "accel_mode")


def randn(*shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --- unbroadcast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 1, 4, 5), (1, 3, 1, 1), (3, 1, 1), (5,), (1,), ()])
def test_unbroadcast_sums_over_broadcast_axes(shape):
    grad = randn(2, 3, 4, 5)
    expected = np.zeros(shape)
    for idx in np.ndindex(*grad.shape):  # each output entry adds into the input entry it read
        expected[ref.source_index(idx, shape)] += grad[idx]
    out = unbroadcast(grad, shape)
    assert out.shape == shape
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_unbroadcast_returns_the_same_array_when_nothing_was_broadcast():
    grad = randn(2, 3)
    assert unbroadcast(grad, (2, 3)) is grad


# --- Sigmoid ---------------------------------------------------------------------------------------


def test_sigmoid_forward_matches_reference():
    x = 4 * randn(2, 3, 5, 4)
    np.testing.assert_allclose(Sigmoid().forward(x), ref.sigmoid(x), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_saturates_without_overflow(dtype):
    x = np.array([-1e4, -800.0, -100.0, 0.0, 100.0, 800.0, 1e4], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in exp would warn
        out = Sigmoid().forward(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out[[0, 1, 5, 6]], [0.0, 0.0, 1.0, 1.0])
    assert out[3] == 0.5 and 0 <= out[2] < 1e-40 and out[4] == 1.0


def test_sigmoid_backward_is_s_times_one_minus_s():
    x, dout = 3 * randn(2, 3, 4, 4), randn(2, 3, 4, 4, seed=1)
    sig = Sigmoid()
    s = ref.sigmoid(x)
    sig.forward(x)
    np.testing.assert_allclose(sig.backward(dout), dout * s * (1 - s), rtol=1e-12, atol=1e-15)


def test_sigmoid_gradient_matches_finite_differences():
    errors = check_module(Sigmoid(), 3 * randn(2, 3, 4, 5, seed=2))
    assert errors["input0"] <= 1e-6, errors


# --- Add and Multiply ------------------------------------------------------------------------------

PAIRS = [
    ((2, 3, 4, 5), (2, 3, 4, 5)),   # same shape: a residual addition
    ((2, 3, 4, 5), (2, 1, 4, 5)),   # one map for every channel: an attention gate
    ((2, 3, 4, 5), (1, 3, 1, 1)),   # one value per channel
    ((2, 3, 4, 5), (3, 1, 1)),      # fewer axes: aligned on the right
    ((2, 1, 4, 5), (1, 3, 1, 1)),   # both broadcast
    ((2, 3, 4, 5), ()),             # a scalar
]
PAIR_IDS = [f"{a}x{b}" for a, b in PAIRS]


ELEMENTWISE = pytest.mark.parametrize("layer,forward_ref,backward_ref", [
    (Add, ref.add, ref.add_backward), (Multiply, ref.multiply, ref.multiply_backward)], ids=["Add", "Multiply"])


@ELEMENTWISE
@pytest.mark.parametrize("a_shape,b_shape", PAIRS, ids=PAIR_IDS)
def test_add_and_multiply_match_reference(layer, forward_ref, backward_ref, a_shape, b_shape):
    a, b = randn(*a_shape), randn(*b_shape, seed=1)
    m = layer()
    out = m.forward(a, b)
    np.testing.assert_allclose(out, forward_ref(a, b), rtol=1e-14, atol=1e-15)
    dout = randn(*out.shape, seed=2)
    da, db = m.backward(dout)
    ref_da, ref_db = backward_ref(a, b, dout)
    assert da.shape == a_shape and db.shape == b_shape
    np.testing.assert_allclose(da, ref_da, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, ref_db, rtol=1e-12, atol=1e-12)


@ELEMENTWISE
@pytest.mark.parametrize("a_shape,b_shape", PAIRS, ids=PAIR_IDS)
def test_add_and_multiply_gradients_match_finite_differences(layer, forward_ref, backward_ref, a_shape, b_shape):
    errors = check_module(layer(), randn(*a_shape, seed=3), randn(*b_shape, seed=4))
    assert max(errors.values()) <= 1e-6, errors


def test_add_of_three_inputs():
    a, b, c = randn(2, 3, 4), randn(1, 3, 1, seed=1), randn(4, seed=2)
    layer = Add()
    np.testing.assert_allclose(layer.forward(a, b, c), ref.add(ref.add(a, b), c), rtol=1e-14)
    assert [g.shape for g in layer.backward(np.ones((2, 3, 4)))] == [(2, 3, 4), (1, 3, 1), (4,)]
    errors = check_module(Add(), a, b, c)
    assert max(errors.values()) <= 1e-6, errors


def test_add_hands_the_same_gradient_to_equal_shaped_inputs():
    a, b = randn(2, 3), randn(2, 3, seed=1)
    layer = Add()
    layer.forward(a, b)
    dout = randn(2, 3, seed=2)
    da, db = layer.backward(dout)
    assert da is dout and db is dout  # no copies: the derivative of a sum is 1 for each term


@pytest.mark.parametrize("layer", [Add, Multiply])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_multiply_keep_dtype(layer, dtype):
    a, b = randn(2, 3, 4, 4, dtype=dtype), randn(2, 1, 4, 4, seed=1, dtype=dtype)
    m = layer()
    out = m.forward(a, b)
    assert out.dtype == dtype
    assert all(g.dtype == dtype for g in m.backward(np.ones(out.shape, dtype=dtype)))


# --- Upsample --------------------------------------------------------------------------------------


def test_upsample_known_values():
    # the values PyTorch's nn.Upsample(scale_factor=2) gives for this input
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    nearest = [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    bilinear = [[1.0, 1.25, 1.75, 2.0], [1.5, 1.75, 2.25, 2.5], [2.5, 2.75, 3.25, 3.5], [3.0, 3.25, 3.75, 4.0]]
    np.testing.assert_array_equal(Upsample(2, "nearest").forward(x)[0, 0], nearest)
    np.testing.assert_allclose(Upsample(2, "bilinear").forward(x)[0, 0], bilinear, rtol=1e-15)


CASES = [(2, "nearest"), (3, "nearest"), (2, "bilinear"), (3, "bilinear"), (1.5, "bilinear")]
CASE_IDS = [f"{m}x{s}" for s, m in CASES]


@pytest.mark.parametrize("scale,mode", CASES, ids=CASE_IDS)
def test_upsample_matches_reference(scale, mode):
    x = randn(2, 3, 4, 5)
    layer = Upsample(scale, mode)
    out = layer.forward(x)
    assert out.shape == (2, 3, int(4 * scale), int(5 * scale))
    np.testing.assert_allclose(out, ref.upsample(x, scale, mode), rtol=1e-13, atol=1e-14)
    dout = randn(*out.shape, seed=1)
    np.testing.assert_allclose(layer.backward(dout), ref.upsample_backward(x.shape, dout, scale, mode),
                               rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("scale,mode", CASES, ids=CASE_IDS)
def test_upsample_gradient_matches_finite_differences(scale, mode):
    errors = check_module(Upsample(scale, mode), randn(2, 2, 3, 4, seed=5))
    assert errors["input0"] <= 1e-6, errors


def test_upsample_bilinear_keeps_values_in_their_range_and_constants_constant():
    # bilinear weights are a convex combination: attention coefficients in (0, 1) stay in (0, 1)
    x = np.random.default_rng(0).uniform(0.01, 0.99, (2, 1, 5, 3))
    out = Upsample(2, "bilinear").forward(x)
    assert out.min() >= x.min() and out.max() <= x.max()
    np.testing.assert_allclose(Upsample(2, "bilinear").forward(np.full((1, 2, 3, 3), 0.7)), 0.7, rtol=1e-15)


def test_upsample_of_channels_last_memory():
    # conv outputs are NCHW-shaped views of channels-last memory: the result must not depend on it
    x = randn(2, 4, 5, 3)
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for mode in ("nearest", "bilinear"):
        np.testing.assert_allclose(Upsample(2, mode).forward(x_cl), Upsample(2, mode).forward(x), rtol=1e-15)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_upsample_keeps_dtype(mode, dtype):
    layer = Upsample(2, mode)
    out = layer.forward(randn(1, 2, 3, 3, dtype=dtype))
    assert out.dtype == dtype
    assert layer.backward(np.ones(out.shape, dtype=dtype)).dtype == dtype


def test_upsample_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nearest, bilinear"):
        Upsample(2, "bicubic")
    with pytest.raises(ValueError, match="positive"):
        Upsample(0)


# --- the strict CuPy stand-in ----------------------------------------------------------------------


def test_layers_run_on_the_cupy_stand_in(fake_cupy):
    """Only xp functions, no host arrays mixed in, no device -> host copies in forward or backward."""
    from tinyunet.backend import to_device, to_host

    x, m = to_device(randn(2, 3, 4, 4)), to_device(randn(2, 1, 4, 4, seed=1))
    cases = [(Sigmoid(), (x,)), (Add(), (x, m)), (Multiply(), (x, m)),
             (Upsample(2, "nearest"), (x,)), (Upsample(2, "bilinear"), (x,))]
    fake_cupy.reset_counters()
    results = []
    for layer, inputs in cases:
        out = layer.forward(*inputs)
        grads = layer.backward(out)
        results.append((out, grads))
    assert fake_cupy.stats["transfers"] == 0, fake_cupy.transfer_log
    host_x, host_m = to_host(x), to_host(m)
    np.testing.assert_allclose(to_host(results[1][0]), host_x + host_m)
    np.testing.assert_allclose(to_host(results[4][0]), ref.upsample(host_x, 2, "bilinear"), rtol=1e-13)
