"""The fast paths a mutation audit found untested, reached through the public layers only (what
tinyunet/accel runs behind them may change): compared with float64 references written with loops
(tinyunet/nn/naive.py, and the gradients below, checked against it), on inputs above every size
threshold, with the compiled code on and off, and the reference layers alone.

- Conv2d's weight gradient: layers with more rows than the block-sum threshold (16384 output rows:
  the U-Net's first level at the default batch 8 x 128 x 128 has 131072) sum their rows in blocks
  and add the blocks' sums; a block that skipped its first segment gave dW 1-9% wrong, silently.
  Batch 2 at 96 x 96 is 18432 rows, in 4 blocks.
- ReLU's compiled loop, which the layer takes for channels-last batches (every activation of the
  U-Net), while the layer's other tests hand it NCHW arrays.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import compiled_code
from tinyunet import backend
from tinyunet.nn import Conv2d, ReLU
from tinyunet.nn import naive as ref


def conv_weight_grad(x: np.ndarray, dout: np.ndarray, kh: int, kw: int, padding: int) -> np.ndarray:
    """dW[o, c, i, j] = sum over n, y, x of dout[n, o, y, x] * x[n, c, y + i - p, x + j - p] (zero
    outside), stride 1, float64: one loop per weight entry, the sum over pixels written out."""
    n, cin, h, w = x.shape
    cout, ho, wo = dout.shape[1:]
    xp = np.zeros((n, cin, h + 2 * padding, w + 2 * padding))
    xp[:, :, padding:padding + h, padding:padding + w] = x
    d = dout.astype(np.float64)
    dw = np.zeros((cout, cin, kh, kw))
    for o in range(cout):
        for c in range(cin):
            for i in range(kh):
                for j in range(kw):
                    dw[o, c, i, j] = np.sum(d[:, o] * xp[:, c, i:i + ho, j:j + wo])
    return dw


def conv_input_grad(dout: np.ndarray, weight: np.ndarray, h: int, w: int, padding: int) -> np.ndarray:
    """dx[n, c, y, x] = sum over o, i, j of dout[n, o, y - i + p, x - j + p] * W[o, c, i, j] (zero
    outside), stride 1, float64: a gather per input pixel, one loop per weight entry."""
    n, cout, ho, wo = dout.shape
    cin, kh, kw = weight.shape[1:]
    dpad = np.zeros((n, cout, h + kh - 1, w + kw - 1))  # dout placed so that dout[y - i + p] is a slice
    dpad[:, :, kh - 1 - padding:kh - 1 - padding + ho, kw - 1 - padding:kw - 1 - padding + wo] = dout
    dx = np.zeros((n, cin, h, w))
    for o in range(cout):
        for c in range(cin):
            for i in range(kh):
                for j in range(kw):
                    dx[:, c] += weight[o, c, i, j] * dpad[:, o, kh - 1 - i:kh - 1 - i + h, kw - 1 - j:kw - 1 - j + w]
    return dx


def test_the_gradient_references_agree_with_the_loop_convolution():
    """d/dW and d/dx of sum(conv2d(x, W) * dout), with conv2d the naive loop of tinyunet/nn/naive.py:
    the sum is linear in W and in x, so it equals sum(W * dW) and sum(x * dx)."""
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((4, 3, 3, 3))
    for padding in (0, 1, 2):
        dout = rng.standard_normal(ref.conv2d(x, weight, None, 1, padding).shape)
        total = np.sum(ref.conv2d(x, weight, None, 1, padding) * dout)
        assert np.sum(weight * conv_weight_grad(x, dout, 3, 3, padding)) == pytest.approx(total, rel=1e-12)
        assert np.sum(x * conv_input_grad(dout, weight, 5, 6, padding)) == pytest.approx(total, rel=1e-12)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(params=["compiled kernels", "blas", "reference layer"])
def conv_mode(request):
    """The CPU acceleration with Numba's kernels (where installed), without them (BLAS products), and
    the reference layer alone (TINYUNET_ACCEL=0)."""
    accelerate = backend.set_acceleration(request.param != "reference layer")
    with compiled_code(request.param == "compiled kernels"):
        yield request.param
    backend.set_acceleration(accelerate)


@pytest.mark.parametrize("cin, cout", [(3, 16), (16, 16), (32, 16)], ids=["rgb", "16", "32"])
def test_conv_above_the_block_sum_threshold(conv_mode, cin, cout):
    """float32 Conv2d (3x3, padding 1) on 2 x 96 x 96 images: forward, weight gradient and input
    gradient against float64 references."""
    rng = np.random.default_rng(cin)
    n, h, w = 2, 96, 96
    assert n * h * w > 16384  # rows of the weight gradient's sum: above the threshold
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    dout = rng.standard_normal((n, cout, h, w)).astype(np.float32)
    layer = Conv2d(cin, cout, 3, padding=1, bias=False)
    weight = layer.weight.data.astype(np.float64)
    out = np.asarray(layer.forward(x))
    dx = np.asarray(layer.backward(dout))
    dw = np.asarray(layer.weight.grad)
    expected_dw = conv_weight_grad(x.astype(np.float64), dout, 3, 3, 1)
    assert relative_error(dw, expected_dw) < 1e-5
    assert relative_error(dx, conv_input_grad(dout, weight, h, w, 1)) < 1e-5
    # the forward, per output pixel the sum the weight gradient sums over: checked on a few images'
    # corners and middles against the loop reference (all of it would take minutes)
    for rows, cols in ((slice(0, 3), slice(0, 3)), (slice(46, 50), slice(93, 96)), (slice(93, 96), slice(40, 44))):
        piece = x[:, :, max(rows.start - 1, 0):rows.stop + 1, max(cols.start - 1, 0):cols.stop + 1]
        pad_top, pad_left = (1 if rows.start == 0 else 0), (1 if cols.start == 0 else 0)
        full = ref.conv2d(np.pad(piece.astype(np.float64), ((0, 0), (0, 0), (pad_top, 1 if rows.stop == h else 0),
                                                             (pad_left, 1 if cols.stop == w else 0))), weight, None)
        assert relative_error(out[:, :, rows, cols], full) < 1e-5


@pytest.mark.parametrize("layout", ["channels-last", "padded rows"])
def test_relu_compiled_loop_through_the_layer(layout):
    """ReLU on the U-Net's layout (channels-last; or the interior of a buffer with a border, as a
    convolution may hand it over) takes the compiled loop where Numba is installed: against the loop
    reference, forward and backward, float32."""
    rng = np.random.default_rng(1)
    n, c, h, w = 4, 16, 20, 24
    values = rng.standard_normal((n, c, h, w)).astype(np.float32)
    values[0, 0, 0, :4] = 0.0  # exactly zero: out 0, gradient 0
    dout_values = rng.standard_normal((n, c, h, w)).astype(np.float32)

    def arrange(a):
        if layout == "channels-last":
            return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        buffer = np.full((n, h + 1, w + 2, c), np.nan, dtype=a.dtype)  # NaN border: reading it would show
        buffer[:, :h, :w] = a.transpose(0, 2, 3, 1)
        return buffer[:, :h, :w].transpose(0, 3, 1, 2)

    expected = ref.relu(values)
    expected_dx = np.where(expected > 0, dout_values.astype(np.float64), 0.0)
    with compiled_code(True):
        layer = ReLU()
        out = layer.forward(arrange(values))
        dx = layer.backward(arrange(dout_values))
    assert out.dtype == dx.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(out), expected.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(dx), expected_dx.astype(np.float32))
