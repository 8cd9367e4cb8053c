"""The accelerated MaxPool2d, ConvTranspose2d, Concat, ReLU and BatchNorm2d (tinyunet/accel) against the
reference layers (tinyunet/nn), forward and backward, float32 and float64, channels-last and NCHW
memory, one block of images and many (above the 2**24 work at which the thread pool splits a call)."""
import copy

import numpy as np
import pytest

from accel_check import assert_same, step, tolerance
from tinyunet import backend
from tinyunet.accel import compiled_loops, parallel
from tinyunet.accel.concat import ChannelsLastConcat
from tinyunet.accel.norm import CompiledBatchNorm, RowsBatchNorm
from tinyunet.accel.pool import SeparablePool
from tinyunet.accel.relu import BlockedReLU, CompiledReLU
from tinyunet.accel.upconv import RowsConvTranspose
from tinyunet.nn import BatchNorm2d, Concat, ConvTranspose2d, MaxPool2d, ReLU

pytestmark = pytest.mark.usefixtures("numpy_backend")
numba = pytest.mark.skipif(not compiled_loops.available(), reason="Numba is not installed")

# (N, C, H, W): odd sizes, batch 1, and a batch big enough that the layers split it into blocks of images
SHAPES = [(2, 3, 7, 9), (1, 16, 6, 5), (8, 16, 128, 128)]


def data(shape, dtype, channels_last, seed=0, distinct=False):
    rng = np.random.default_rng(seed)
    x = (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 if distinct
         else rng.standard_normal(shape)).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return x


def splits(shape) -> bool:
    """Whether a streaming layer on this batch runs in more than one block of images."""
    per_image = int(np.prod(shape[1:]))
    return len(parallel.row_blocks(shape[0], 2 * parallel.ELEMENTWISE_WORK * per_image)) > 1


def test_the_big_shape_is_split_into_blocks_and_the_small_ones_are_not():
    assert [splits(s) for s in SHAPES] == [False, False, True]


def compare(implementation, layer, inputs, dout, dtype):
    expected = step(layer, inputs, dout)
    got = step(layer, inputs, dout, implementation)
    assert_same(got, expected, tolerance(dtype))


POOL_CASES = [(shape, k, s, dtype, channels_last) for shape in SHAPES[:2] for k, s in [(2, 2), (3, 2), (3, 1), (2, 3)]
              for dtype in (np.float64, np.float32) for channels_last in (True, False)]
POOL_CASES.append((SHAPES[2], 2, 2, np.float32, True))   # the big batch once, as the U-Net runs it


@pytest.mark.parametrize("shape, k, s, dtype, channels_last", POOL_CASES)
def test_separable_pool_equals_the_reference(shape, k, s, dtype, channels_last):
    """Distinct values (no ties) and ties (after a ReLU whole windows are 0): the first maximum wins."""
    layer = MaxPool2d(k, s)
    for x in (data(shape, dtype, channels_last, distinct=True), np.maximum(data(shape, dtype, channels_last), 0)):
        ho, wo = (shape[2] - k) // s + 1, (shape[3] - k) // s + 1
        dout = data((shape[0], shape[1], ho, wo), dtype, channels_last, seed=1)
        compare(SeparablePool(layer), layer, (x,), dout, dtype)


@pytest.mark.parametrize("k, s", [(16, 16), (16, 1), (17, 17), (17, 1), (20, 3)])
def test_pool_windows_at_and_above_the_uint8_offset(k, s):
    """The separable pool keeps each window's offset i * k + j in a uint8: it runs up to k = 16 (256
    offsets) and declines above, where the offsets would wrap and backward route the gradient to the wrong
    pixel; the layer, whichever runs, equals the loop reference (float64 and float32)."""
    from tinyunet.nn import naive

    layer = MaxPool2d(k, s)
    x = data((2, 3, 35, 36), np.float64, False, distinct=True)
    assert SeparablePool.accepts(layer, x) == (k <= 16)
    if k <= 16:
        compare(SeparablePool(layer), layer, (x,), data((2, 3, (35 - k) // s + 1, (36 - k) // s + 1), np.float64,
                                                         False, seed=1), np.float64)
    for dtype in (np.float64, np.float32):
        xd = x.astype(dtype)
        out = layer.forward(xd)
        dout = data(out.shape, dtype, False, seed=1)
        dx = layer.backward(dout)
        ref_out, ref_dx = naive.maxpool2d(xd, k, s)[0], naive.maxpool2d_backward(xd, dout, k, s)
        np.testing.assert_array_equal(out, ref_out)
        # overlapping windows add up in another order: equal to rounding (a misrouted gradient is off by O(1))
        np.testing.assert_allclose(dx, ref_dx, rtol=0, atol=tolerance(dtype) * np.abs(ref_dx).max())


def test_pool_backward_in_the_precision_of_its_gradient():
    """A float64 gradient into a float32 layer gives a float64 dx, as the reference does."""
    layer = MaxPool2d(2, 2)
    x = data((2, 3, 8, 8), np.float32, True)
    dout = data((2, 3, 4, 4), np.float64, True, seed=1)
    with_accel = step(layer, (x,), dout, SeparablePool(layer))
    reference = step(layer, (x,), dout)
    assert with_accel["dx"][0].dtype == reference["dx"][0].dtype == np.float64


@pytest.mark.parametrize("cin, cout, k, s, p, n, h, w", [(4, 3, 2, 2, 0, 2, 3, 5), (2, 3, 3, 2, 1, 1, 4, 3),
                                                          (3, 2, 3, 1, 0, 2, 5, 4), (3, 2, 4, 2, 1, 2, 3, 3),
                                                          (32, 16, 2, 2, 0, 8, 64, 64),
                                                          # kernel = stride with padding, gaps (kernel < stride), wide
                                                          (3, 2, 2, 2, 1, 2, 4, 3), (3, 2, 2, 3, 0, 2, 3, 3),
                                                          (256, 128, 2, 2, 0, 1, 4, 4)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_rows_transposed_convolution_equals_the_reference(cin, cout, k, s, p, n, h, w, dtype, bias):
    """Kernel = stride (the stamps tile the output: a copy) and overlapping stamps (row2im); the
    U-Net's 32 -> 16 at 64x64 in blocks."""
    backend.seed(0)
    layer = ConvTranspose2d(cin, cout, k, stride=s, padding=p, bias=bias).to(dtype)
    x = data((n, cin, h, w), dtype, channels_last=True)
    dout = data((n, cout, layer.output_size(h, 0), layer.output_size(w, 1)), dtype, True, seed=1)
    compare(RowsConvTranspose(layer), layer, (x,), dout, dtype)


@pytest.mark.parametrize("shapes", [[(2, 2, 3, 3), (2, 3, 3, 3)], [(1, 16, 5, 4), (1, 16, 5, 4), (1, 1, 5, 4)],
                                    [(8, 16, 128, 128), (8, 16, 128, 128)]])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_channels_last_concat_equals_the_reference(shapes, dtype):
    layer = Concat(1)
    inputs = tuple(data(s, dtype, channels_last=i % 2 == 0, seed=i) for i, s in enumerate(shapes))
    out_shape = (shapes[0][0], sum(s[1] for s in shapes)) + shapes[0][2:]
    layer.sizes = tuple(s[1] for s in shapes)
    compare(ChannelsLastConcat(layer), layer, inputs, data(out_shape, dtype, True, seed=9), dtype)


def relu_implementations():
    return [BlockedReLU] + ([CompiledReLU] if compiled_loops.available() else [])


@pytest.mark.parametrize("implementation", relu_implementations())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dout_layout", ["channels-last", "nchw"])
def test_relu_equals_the_reference(implementation, shape, dtype, dout_layout):
    """Also with a gradient in other memory than the output's (the compiled loop then hands over to
    the NumPy passes): values away from the kink, and exact zeros (the gradient there is 0)."""
    layer = ReLU()
    x = data(shape, dtype, channels_last=True)
    x[:, :, ::3] = 0.0
    if implementation is CompiledReLU:
        assert CompiledReLU.accepts(layer, x)
    compare(implementation(layer), layer, (x,), data(shape, dtype, dout_layout == "channels-last", seed=1), dtype)


def batchnorm_implementations():
    return [RowsBatchNorm] + ([CompiledBatchNorm] if compiled_loops.available() else [])


# the big batch in float32 only, as the U-Net runs it
NORM_CASES = [(shape, dtype) for shape in SHAPES for dtype in (np.float64, np.float32)
              if shape[0] < 8 or dtype == np.float32]


@pytest.mark.parametrize("implementation", batchnorm_implementations())
@pytest.mark.parametrize("shape, dtype", NORM_CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dout_layout", ["channels-last", "nchw"])
def test_batchnorm_equals_the_reference(implementation, shape, dtype, training, dout_layout):
    """Train mode (the batch's statistics, and the running averages they update) and eval mode, with
    a mean far from 0 (where a one-pass variance would cancel), and a gradient in either memory layout."""
    backend.seed(0)
    layer = BatchNorm2d(shape[1]).to(dtype)
    rng = np.random.default_rng(3)
    layer.weight.data[...] = rng.uniform(0.5, 2.0, shape[1])
    layer.bias.data[...] = rng.standard_normal(shape[1])
    layer.train(training)
    if not training:
        layer.running_mean, layer.running_var = (rng.standard_normal(shape[1]).astype(dtype),
                                                 rng.uniform(0.5, 2.0, shape[1]).astype(dtype))
    x = data(shape, dtype, channels_last=True) * 3 + 100.0
    dout = data(shape, dtype, dout_layout == "channels-last", seed=1)
    assert implementation.accepts(layer, x)
    # the reference in float64 (on a float64 copy): float32 sums over 2M pixels round at ~1e-4 in any
    # order, so the float32 implementation is held to the exact numbers, not to another rounding of them
    exact = copy.deepcopy(layer).to(np.float64)
    expected = step(exact, (x.astype(np.float64),), dout.astype(np.float64))
    got = step(layer, (x,), dout, implementation(layer))
    expected = {k: (tuple(d.astype(dtype) for d in v) if k == "dx" else v.astype(dtype)) for k, v in expected.items()}
    assert_same(got, expected, 1e-4 if dtype == np.float32 else 1e-9)
    for mine, theirs in zip((layer.running_mean, layer.running_var), (exact.running_mean, exact.running_var)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_batchnorm_of_nchw_memory_is_left_to_the_reference():
    """The accelerated BatchNorms take channels-last memory only: NCHW memory runs the reference."""
    from tinyunet.accel.choose import choose
    layer = BatchNorm2d(3)
    assert choose(layer, data((2, 3, 4, 5), np.float32, channels_last=False)) is None
    assert choose(layer, data((2, 3, 4, 5), np.float32, channels_last=True)) is not None
