"""Winograd F(2x2, 3x3) (tinyunet/accel/winograd.py): the transforms, the fast blocked form and its
gradients against the loop reference (nn/naive.py). The layer against the reference Conv2d:
tests/test_accel_conv.py; when the chooser picks it: tests/test_accel_choose.py."""
import numpy as np
import pytest

from tinyunet.accel import winograd
from tinyunet.accel.conv import nchw, nhwc
from tinyunet.accel.winograd import (winograd_conv3x3, winograd_weight_grad, winograd_weight_grad_to_kernel,
                                     winograd_weights)
from tinyunet.nn.naive import conv2d as conv2d_naive

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


def test_one_tile_by_the_formula_is_the_convolution():
    """Y = A^T [(G g G^T) * (B^T d B)] A for one 4x4 tile d and one 3x3 kernel g: the 2x2 outputs of the
    correlation of d with g."""
    rng = np.random.default_rng(1)
    d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
    y = winograd.A_T @ ((winograd.G @ g @ winograd.G.T) * (winograd.B_T @ d @ winograd.B_T.T)) @ winograd.A_T.T
    expected = [[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(2)] for i in range(2)]
    np.testing.assert_allclose(y, expected, rtol=1e-12)


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
