"""Winograd F(2x2, 3x3) (tinyunet/nn/winograd.py): the formula, the fast blocked form, its gradients,
and when Conv2d uses it."""
import numpy as np
import pytest

from tinyunet import backend
from tinyunet.gradcheck import check_module
from tinyunet.nn import Conv2d
from tinyunet.nn import conv as conv_module
from tinyunet.nn import winograd
from tinyunet.nn.conv import conv2d_naive, nchw, nhwc
from tinyunet.nn.winograd import (winograd_conv3x3, winograd_conv3x3_naive, winograd_weight_grad,
                                  winograd_weight_grad_to_kernel, winograd_weights)

pytestmark = pytest.mark.usefixtures("numpy_backend")


@pytest.fixture(params=["one chunk", "small chunks"])
def chunks(request, monkeypatch):
    """The default chunks, and chunks of one tile row each (several chunks and blocks per call)."""
    if request.param == "small chunks":
        monkeypatch.setattr(winograd, "_CHUNK_BYTES", 1)
    return request.param


def weight_grad_reference(x, dout):
    """dweight[o, c, i, j] = sum over n, y, x of dout[n, o, y, x] * xpad[n, c, y + i, x + j]."""
    h, w = x.shape[2:]
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((dout.shape[1], x.shape[1], 3, 3))
    for i in range(3):
        for j in range(3):
            out[:, :, i, j] = np.einsum("noyx,ncyx->oc", dout, xpad[:, :, i:i + h, j:j + w])
    return out


def test_transform_matrices_compute_a_1d_correlation():
    """F(2, 3) in one dimension: A^T [(G g) * (B^T d)] gives the 2 outputs of correlating d (4) with g (3)."""
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal(4), rng.standard_normal(3)
    expected = [d[0:3] @ g, d[1:4] @ g]
    np.testing.assert_allclose(winograd.A_T @ ((winograd.G @ g) * (winograd.B_T @ d)), expected, rtol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (1, 2, 2, 2), (3, 1, 8, 4)])
def test_naive_tiles_equal_the_convolution(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    weight = rng.standard_normal((5, shape[1], 3, 3))
    np.testing.assert_allclose(winograd_conv3x3_naive(x, weight), conv2d_naive(x, weight, None, 1, 1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (1, 5, 10, 2), (3, 4, 2, 8)])
def test_fast_form_equals_the_convolution(shape, chunks):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    weight = rng.standard_normal((6, shape[1], 3, 3))
    expected = conv2d_naive(x, weight, None, 1, 1)
    channels_last = np.ascontiguousarray(nhwc(x))
    for x_nhwc in (channels_last, nhwc(x)):  # channels-last memory and NCHW memory
        out = winograd_conv3x3(x_nhwc, winograd_weights(weight))
        assert out.flags.c_contiguous and out.shape == expected.transpose(0, 2, 3, 1).shape
        np.testing.assert_allclose(nchw(out), expected, rtol=1e-12, atol=1e-12)


def test_weight_gradient_equals_the_sum_over_pixels(chunks):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 4))
    dout = rng.standard_normal((2, 5, 6, 4))
    du = winograd_weight_grad(nhwc(x), nhwc(dout))
    np.testing.assert_allclose(winograd_weight_grad_to_kernel(du), weight_grad_reference(x, dout),
                               rtol=1e-12, atol=1e-12)


def test_kernel_gradient_transform_is_the_adjoint_of_the_weight_transform():
    """<U(g), dU> == <g, G^T dU G>: the chain rule through U = G g G^T."""
    rng = np.random.default_rng(4)
    g = rng.standard_normal((4, 3, 3, 3))
    du = rng.standard_normal((16, 3, 4))
    assert np.sum(winograd_weights(g) * du) == pytest.approx(np.sum(g * winograd_weight_grad_to_kernel(du)), rel=1e-12)


def test_flipped_weights_are_the_weights_of_the_flipped_kernel():
    """The input gradient's U: the kernel flipped in both directions and its channel axes swapped,
    computed from the weight as it lies in memory (GG's columns reversed)."""
    rng = np.random.default_rng(8)
    g = rng.standard_normal((4, 3, 3, 3))
    flipped = winograd_weights(g, flipped=True)
    assert flipped.shape == (16, 4, 3) and flipped.flags.c_contiguous
    np.testing.assert_allclose(flipped, winograd_weights(g[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)), rtol=1e-13, atol=1e-13)


def test_float32_error_stays_near_float32_rounding():
    """64 channels in float32 against the float64 convolution: the transforms lose little."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64, 8, 8))
    weight = rng.standard_normal((64, 64, 3, 3)) / 24
    expected = conv2d_naive(x, weight, None, 1, 1)
    out = nchw(winograd_conv3x3(nhwc(x.astype(np.float32)), winograd_weights(weight.astype(np.float32))))
    assert out.dtype == np.float32
    assert np.abs(out - expected).max() / np.abs(expected).max() < 2e-6


@pytest.fixture
def winograd_everywhere(monkeypatch):
    monkeypatch.setattr(conv_module, "_MIN_WINOGRAD_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_MIN_WINOGRAD_TILES", 1)


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_winograd_forward_and_gradients(bias, winograd_everywhere, chunks):
    backend.seed(0)
    conv = Conv2d(5, 4, 3, padding=1, bias=bias).to(np.float64)  # 5 channels: past im2col's limit
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 5, 6, 4))
    assert conv._method(2, 6, 4) == "winograd"
    expected = conv2d_naive(x, conv.weight.data, conv.bias.data if bias else None, 1, 1)
    np.testing.assert_allclose(conv.forward(x), expected, rtol=1e-12, atol=1e-12)
    conv.zero_grad()
    dout = rng.standard_normal(expected.shape)
    conv.backward(dout)
    np.testing.assert_allclose(conv.weight.grad, weight_grad_reference(x, dout), rtol=1e-11, atol=1e-11)
    errors = check_module(conv, x, seed=0)  # every gradient against finite differences, float64
    assert set(errors) == {"input0", "weight"} | ({"bias"} if bias else set())
    assert max(errors.values()) < 1e-6, errors


@pytest.fixture
def blas_products():
    """The layers' rules with BLAS running the shifted products (no Numba, or the kernels off)."""
    from tinyunet import kernels
    before = kernels.set_enabled(False)
    yield
    kernels.set_enabled(before)


def test_conv2d_uses_winograd_only_where_it_was_measured_faster(blas_products):
    """3x3, stride 1, padding 1, even output sides, >= 64 channels in and out, >= 512 tiles (batch x
    Hout/2 x Wout/2); anything else keeps its method."""
    wide = Conv2d(64, 128, 3, padding=1)
    assert wide._method(8, 16, 16) == "winograd" == wide._method(2, 32, 32)
    assert wide._method(1, 16, 16) == "im2row"          # 64 tiles: too few rows for the products
    assert wide._method(8, 32, 33) == "shifted"         # odd width: tiles would not cover it
    assert Conv2d(32, 64, 3, padding=1)._method(8, 32, 32) == "shifted"
    assert Conv2d(64, 32, 3, padding=1)._method(8, 64, 64) == "shifted"
    assert Conv2d(64, 64, 3, padding=1, stride=2)._method(8, 32, 32) == "im2row"
    assert Conv2d(64, 64, 3, padding=0)._method(8, 32, 32) == "shifted"
    assert Conv2d(64, 64, 5, padding=2)._method(8, 32, 32) == "shifted"


def test_with_the_direct_kernels_winograd_needs_128_channels():
    """With direct_conv's kernels the shifted products beat Winograd up to 64 channels on a side and
    im2row for every layer big enough to share between threads (2**24 multiply-adds; Conv2d._method's
    measurements); channels that are no multiple of 16 keep the BLAS rules."""
    pytest.importorskip("numba")
    from tinyunet import kernels
    before = kernels.set_enabled(True)
    try:
        assert Conv2d(64, 128, 3, padding=1)._method(8, 16, 16) == "shifted"
        assert Conv2d(128, 128, 3, padding=1)._method(8, 16, 16) == "winograd"
        assert Conv2d(256, 256, 3, padding=1)._method(8, 8, 8) == "shifted"       # 512 outputs
        assert Conv2d(256, 256, 3, padding=1)._method(1, 8, 8) == "shifted"       # 64 outputs, 37.7M multiply-adds
        assert Conv2d(128, 128, 3, padding=1)._method(1, 8, 8) == "im2row"        # 9.4M: too small to share
        assert Conv2d(3, 16, 3, padding=1)._method(1, 128, 128) == "shifted"      # an image: the kernels too
        assert Conv2d(3, 16, 3, padding=1, stride=2)._method(8, 64, 64) == "im2col"
        assert Conv2d(72, 72, 3, padding=1)._method(8, 32, 32) == "winograd"      # 72 = 4.5 x 16: BLAS rules
        assert Conv2d(64, 64, 3, padding=1, stride=2)._method(8, 32, 32) == "im2row"
    finally:
        kernels.set_enabled(before)


def test_every_method_gives_the_same_convolution_and_gradients():
    """Conv2d(method=...) forces a method: all four agree with the loops, forward and backward."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 6, 8))
    dout = rng.standard_normal((2, 3, 6, 8))
    results = {}
    for method in Conv2d.METHODS:
        backend.seed(0)  # the same weights for every method
        conv = Conv2d(5, 3, 3, padding=1, method=method).to(np.float64)
        assert conv._method(2, 6, 8) == method and f"method={method!r}" in repr(conv)
        out = conv.forward(x)
        results[method] = (out, conv.backward(dout), conv.weight.grad.copy(), conv.bias.grad.copy())
    expected = conv2d_naive(x, conv.weight.data, conv.bias.data, 1, 1)
    for method, (out, dx, dw, db) in results.items():
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12, err_msg=method)
        np.testing.assert_allclose(dw, weight_grad_reference(x, dout), rtol=1e-11, atol=1e-11, err_msg=method)
        for got, want in zip((dx, db), results["im2col"][1::2]):
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11, err_msg=method)


def test_a_forced_method_must_apply():
    with pytest.raises(ValueError, match="method must be None or one of"):
        Conv2d(5, 3, 3, method="fft")
    with pytest.raises(ValueError, match="does not apply"):
        Conv2d(5, 3, 3, padding=1, method="winograd").forward(np.zeros((1, 5, 5, 6)))  # odd height
    with pytest.raises(ValueError, match="does not apply"):
        Conv2d(5, 3, 3, stride=2, method="shifted").forward(np.zeros((1, 5, 9, 9)))


def test_one_chunk_on_a_device_many_on_the_cpu(fake_cupy, monkeypatch):
    """On the CuPy stand-in the whole tensor is one chunk (a GPU needs no cache-sized pieces); the
    same call on NumPy runs in several chunks, with the same numbers."""
    seen = []
    real = winograd._input_transform
    monkeypatch.setattr(winograd, "_input_transform", lambda x, t0, t1: seen.append((t0, t1)) or real(x, t0, t1))
    rng = np.random.default_rng(8)
    x, weight = rng.standard_normal((2, 8, 8, 5)).astype(np.float32), rng.standard_normal((3, 5, 3, 3)).astype(np.float32)
    device = winograd_conv3x3(backend.to_device(x), winograd_weights(backend.to_device(weight))).get()
    assert seen == [(0, 4)]
    seen.clear()
    backend.use("numpy")
    host = winograd_conv3x3(x, winograd_weights(weight))
    assert len(seen) == 4  # at least 4 chunks where there are 4 tile rows
    np.testing.assert_allclose(device, host, rtol=1e-6, atol=1e-6)
