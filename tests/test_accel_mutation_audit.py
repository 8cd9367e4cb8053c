"""Fast paths that a mutation audit of tinyunet/accel found untested (60 one-line mutants, 11 survived, 3 of
them equivalent): each test reaches the branch the surviving mutant changed, compares the layer with the
acceleration on against its reference code (tests/accel_check.py), and fails on that mutant.

- the transposed convolution's weight gradient summed over more than 4 row blocks (batch 8 at 96x96);
- the bias added into a channel slice of a wider buffer;
- im2row's input gradient for rectangular kernels (its gather is only right for square ones);
- the compiled ReLU and BatchNorm loops on a channel slice (pixels 2C numbers apart, Concat's views);
- BatchNorm's backward after the layer was switched to eval between forward and backward;
- max-pooling's ties at the window's maximum for kernels 3 and 4;
- Concat of a float32 and a float64 input;
- a stride-2 convolution with more than 256 output pixels (not for the stride-1 methods);
- the direct kernels' input gradient exactly Cin channels wide (contiguous for the loops below).
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest

from accel_check import assert_same, channels_last, compare_layer, step, tolerance
from tinyunet import backend
from tinyunet.accel import compiled_loops, parallel
from tinyunet.accel.conv import Im2rowConv, add_channel_vector
from tinyunet.accel.direct import DirectConv
from tinyunet.accel.norm import CompiledBatchNorm, RowsBatchNorm
from tinyunet.nn import BatchNorm2d, Concat, Conv2d, ConvTranspose2d, MaxPool2d, ReLU

pytestmark = pytest.mark.usefixtures("numpy_backend")


@contextlib.contextmanager
def compiled(on: bool):
    before = compiled_loops.set_enabled(on)
    try:
        yield
    finally:
        compiled_loops.set_enabled(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_upconv_weight_gradient_over_more_than_four_row_blocks(dtype):
    n, cin, cout, h = 8, 16, 8, 96
    assert len(parallel.row_blocks(n * h * h, cin * 4 * cout)) > 4
    backend.seed(0)
    layer = ConvTranspose2d(cin, cout, 2, stride=2).to(dtype)
    rng = np.random.default_rng(0)
    x = channels_last(rng.standard_normal((n, cin, h, h)).astype(dtype))
    dout = channels_last(rng.standard_normal((n, cout, 2 * h, 2 * h)).astype(dtype))
    compare_layer(layer, (x,), dout)


def test_add_channel_vector_on_a_channel_slice():
    v = np.array([1.0, -2.0, 3.5])
    buffer = np.zeros((2, 5, 7, 6))
    a = buffer[..., :3]
    add_channel_vector(a, v)
    np.testing.assert_array_equal(a, np.broadcast_to(v, a.shape))
    assert not buffer[..., 3:].any()


@pytest.mark.parametrize("k, p", [((3, 2), 0), ((3, 2), 1), ((1, 3), 0), ((2, 3), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_im2row_with_a_rectangular_kernel(k, p, dtype):
    backend.seed(0)
    layer = Conv2d(8, 5, k, stride=1, padding=p).to(dtype)
    rng = np.random.default_rng(1)
    x = channels_last(rng.standard_normal((2, 8, 9, 7)).astype(dtype))
    kh, kw = layer.kernel_size
    dout = rng.standard_normal((2, 5, 9 + 2 * p - kh + 1, 7 + 2 * p - kw + 1)).astype(dtype)
    assert_same(step(layer, (x,), dout, Im2rowConv(layer)), step(layer, (x,), dout), tolerance(dtype))
    compare_layer(layer, (x,), dout)      # 9x7 pixels: the chooser takes im2row


def channel_slice(rng, shape, dtype):
    """An NCHW view of the first C channels of a channels-last buffer of 2C: pixels 2C numbers apart."""
    n, c, h, w = shape
    return rng.standard_normal((n, h, w, 2 * c)).astype(dtype)[..., :c].transpose(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_on_a_channel_slice(dtype):
    rng = np.random.default_rng(0)
    x, dout = channel_slice(rng, (2, 16, 5, 6), dtype), channel_slice(rng, (2, 16, 5, 6), dtype)
    with compiled(True):
        compare_layer(ReLU(), (x,), dout)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_on_a_channel_slice(training):
    rng = np.random.default_rng(1)
    x, dout = channel_slice(rng, (2, 16, 5, 6), np.float64), channel_slice(rng, (2, 16, 5, 6), np.float64)
    backend.seed(0)
    layer = BatchNorm2d(16).to(np.float64)
    layer.train(training)
    with compiled(True):
        compare_layer(layer, (x,), dout, rtol=1e-9)


class SwitchedToEvalBeforeBackward:
    """An implementation whose layer is put in eval mode between forward and backward."""

    def __init__(self, implementation, accelerate: bool):
        self.implementation, self.accelerate = implementation, accelerate

    def forward(self, x):
        before = backend.set_acceleration(self.accelerate)
        try:
            return self.implementation.forward(x)
        finally:
            backend.set_acceleration(before)

    def backward(self, dout):
        self.implementation.layer.train(False)
        return self.implementation.backward(dout)


class TheLayer:
    def __init__(self, layer):
        self.layer = layer

    def forward(self, x):
        return self.layer.forward(x)

    def backward(self, dout):
        return self.layer.backward(dout)


@pytest.mark.parametrize("implementation", [RowsBatchNorm, CompiledBatchNorm])
def test_batchnorm_backward_follows_its_forwards_mode(implementation):
    """Backward runs what forward computed: a train-mode forward whose layer is switched to eval before
    backward still differentiates through the batch's statistics, as the reference does."""
    rng = np.random.default_rng(0)
    x = channels_last(rng.standard_normal((2, 16, 5, 6)) * 3 + 10)
    dout = channels_last(rng.standard_normal((2, 16, 5, 6)))
    backend.seed(0)
    layer = BatchNorm2d(16).to(np.float64)
    reference = copy.deepcopy(layer)
    expected = step(reference, (x,), dout, SwitchedToEvalBeforeBackward(TheLayer(reference), accelerate=False))
    with compiled(True):
        assert implementation.accepts(layer, x)
        got = step(layer, (x,), dout, SwitchedToEvalBeforeBackward(implementation(layer), accelerate=True))
    assert_same(got, expected, 1e-9)


@pytest.mark.parametrize("k, s", [(3, 1), (3, 2), (3, 3), (4, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_pool_ties_at_the_windows_maximum(k, s, dtype, layout):
    """Values 0 and 1: most windows' maxima are tied, and the gradient goes to the first (row by row)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (2, 3, 10, 11)).astype(dtype)
    if layout == "channels-last":
        x = channels_last(x)
    dout = rng.standard_normal((2, 3, (10 - k) // s + 1, (11 - k) // s + 1)).astype(dtype)
    compare_layer(MaxPool2d(k, s), (x,), dout)


def test_concat_of_float32_and_float64():
    rng = np.random.default_rng(0)
    a = channels_last(rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    b = channels_last(rng.standard_normal((2, 4, 4, 5)))
    layer = Concat(1)
    layer.sizes = (3, 4)
    got = compare_layer(layer, (a, b), rng.standard_normal((2, 7, 4, 5)), rtol=1e-12)
    assert got["out"].dtype == np.float64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loops", [False, True])
def test_stride_2_convolution_with_more_than_256_output_pixels(dtype, loops):
    backend.seed(0)
    layer = Conv2d(16, 16, 3, stride=2, padding=1).to(dtype)
    rng = np.random.default_rng(0)
    x = channels_last(rng.standard_normal((2, 16, 40, 40)).astype(dtype))    # 20 x 20 = 400 output pixels
    dout = rng.standard_normal((2, 16, 20, 20)).astype(dtype)
    with compiled(loops):
        compare_layer(layer, (x,), dout)


@pytest.mark.skipif(not compiled_loops.available(), reason="Numba is not installed")
@pytest.mark.parametrize("cin", [16, 32])
def test_direct_kernels_input_gradient_is_contiguous_channels_last(cin):
    backend.seed(0)
    layer = Conv2d(cin, 16, 3, padding=1)
    rng = np.random.default_rng(0)
    x = channels_last(rng.standard_normal((2, cin, 9, 7)).astype(np.float32))
    dout = channels_last(rng.standard_normal((2, 16, 9, 7)).astype(np.float32))
    with compiled(True):
        assert_same(step(layer, (x,), dout, DirectConv(layer)), step(layer, (x,), dout), tolerance(np.float32))
        implementation = DirectConv(layer)
        layer.zero_grad()
        implementation.forward(x)
        dx = implementation.backward(dout)
        assert dx.transpose(0, 2, 3, 1).flags.c_contiguous and compiled_loops.usable(dx)
