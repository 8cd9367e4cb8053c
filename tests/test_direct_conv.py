"""The register-blocked kernels of tinyunet/direct_conv.py (Numba): against float64 products, the
rows they compute, and Conv2d with them against Conv2d with BLAS's products (the reference)."""
import numpy as np
import pytest

pytest.importorskip("numba")

from conftest import compiled_code as compiled  # noqa: E402
from tinyunet import direct_conv, kernels, parallel  # noqa: E402
from tinyunet.nn import Conv2d  # noqa: E402

pytestmark = pytest.mark.usefixtures("numpy_backend")


def close(a, b, rtol=1e-5):
    """float32 sums of up to 2304 terms against float64 (a rounding error of ~1e-7 per term, mostly
    cancelling): within rtol of the largest value."""
    assert a.shape == b.shape
    error, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
    assert error <= rtol * max(scale, 1e-30), f"error {error:.3g} of values up to {scale:.3g}"


# (K input channels, N output channels, M rows, T terms): 1, 2 and 4 vectors per tile, rows that are
# no multiple of the block, and input channel counts 16, 8, 4, 2, 1 sums at a time divide
SHAPES = [(16, 16, 1000, 9), (3, 16, 37, 9), (32, 48, 101, 4), (64, 64, 517, 9), (256, 256, 803, 9),
          (16, 32, 5, 1), (5, 16, 300, 2), (24, 64, 77, 3), (12, 128, 40, 9)]


@pytest.mark.parametrize("k, n, m, t", SHAPES)
def test_kernels_match_float64_products_on_their_segments(k, n, m, t):
    rng = np.random.default_rng(k * n + m)
    a = rng.standard_normal((m + 60, k), dtype=np.float32)
    w = rng.standard_normal((t, k, n), dtype=np.float32)
    d = rng.standard_normal((m, n), dtype=np.float32)
    starts = np.sort(rng.integers(0, 60, t)).astype(np.int64)
    cuts = np.sort(rng.choice(np.arange(1, m), size=min(6, m - 1), replace=False)) if m > 2 else np.array([0, m])
    segments = np.array([[0, m]] if m <= 2 else list(zip(cuts[0::2], cuts[1::2])), dtype=np.int64)
    inside = np.zeros(m, bool)
    for first, last in segments:
        inside[first:last] = True
    expected = sum(a[s:s + m].astype(np.float64) @ w[i] for i, s in enumerate(starts)) * inside[:, None]
    out = np.full((m, n), np.nan, dtype=np.float32)        # every row is written: NaN would show
    assert direct_conv.usable(out, a, w)
    direct_conv.shifted_sum(out, a, starts, w, segments)
    close(out, expected)
    assert not out[~inside].any()
    # the weights as a view with other strides (a (K, T, N) array's transpose, as weight_layout gives
    # them), and a share of the output channels: the same numbers, the other columns untouched
    w_view = np.ascontiguousarray(w.transpose(1, 0, 2)).transpose(1, 0, 2)
    share = np.full((m, n), 7.0, dtype=np.float32)
    assert direct_conv.usable(share, a, w_view)
    direct_conv.shifted_sum(share, a, starts, w_view, segments, columns=(0, n - 16) if n >= 32 else None)
    last = n - 16 if n >= 32 else n
    np.testing.assert_array_equal(share[:, :last], out[:, :last])
    assert (share[:, last:] == 7.0).all()
    dw = direct_conv.shifted_weight_grad(a, starts, d, segments)
    expected_dw = np.stack([a[s:s + m][inside].T.astype(np.float64) @ d[inside] for s in starts])
    close(dw, expected_dw)
    if n >= 32:  # a share of the output channels, into a given array: the others stay as they were
        share = np.full((t, k, n), 7.0, dtype=np.float32)
        direct_conv.shifted_weight_grad(a, starts, d, segments, out=share, columns=(16, n))
        close(share[:, :, 16:], expected_dw[:, :, 16:])
        assert (share[:, :, :16] == 7.0).all()


@pytest.mark.parametrize("wp, hp, col0, cols, line0, lines", [(10, 10, 0, 8, 0, 8), (10, 10, 1, 8, 1, 8),
                                                              (7, 5, 2, 3, 1, 3), (4, 4, 0, 4, 0, 4)])
def test_window_segments_are_the_rows_inside_the_window(wp, hp, col0, cols, line0, lines):
    rows = np.arange(3 * hp * wp)
    inside = ((rows % wp >= col0) & (rows % wp < col0 + cols)
              & ((rows // wp) % hp >= line0) & ((rows // wp) % hp < line0 + lines))
    for start, stop in [(0, rows.size), (3, 41), (wp - 1, 2 * hp * wp + 1), (5, 6)]:
        segments = direct_conv.window_segments(start, stop, wp, hp, col0, cols, line0, lines)
        got = np.zeros(stop - start, bool)
        for first, last in segments:
            assert 0 <= first < last <= stop - start and not got[first:last].any()
            got[first:last] = True
        np.testing.assert_array_equal(got, inside[start:stop])
        assert (np.diff(segments.ravel()) >= 0).all()  # in order


def test_usable_only_for_what_the_kernels_take():
    a, w = np.zeros((40, 16), np.float32), np.zeros((9, 16, 32), np.float32)
    out = np.zeros((30, 32), np.float32)
    assert direct_conv.usable(out, a, w)
    assert not direct_conv.usable(out.astype(np.float64), a, w)        # float32 only
    assert not direct_conv.usable(np.zeros((30, 24), np.float32), a, w)  # 24 output channels: not 16k
    assert not direct_conv.usable(np.zeros((30, 64), np.float32)[:, :32], a, w)  # not contiguous
    with compiled(False):
        assert not direct_conv.usable(out, a, w)
    before = direct_conv.set_enabled(False)  # the kernels alone off: BatchNorm's loops stay on
    try:
        assert not direct_conv.usable(out, a, w) and kernels.available()
    finally:
        direct_conv.set_enabled(before)
    assert direct_conv.usable(out, a, w)


def conv_step(conv, x, dout, input_grad=True):
    conv.zero_grad()
    conv.input_grad = input_grad
    y = np.array(conv.forward(x))
    dx = conv.backward(dout)
    return y, None if dx is None else np.array(dx), conv.weight.grad.copy(), conv.bias.grad.copy()


# (Cin, Cout, kernel, padding, N, H, W): the U-Net's 3x3 layers in small, the 1x1 head's dx (its 3
# outputs stay with BLAS), odd sizes, and enough rows that the layers split them into blocks
LAYERS = [(16, 16, 3, 1, 2, 9, 7), (32, 16, 3, 1, 1, 12, 12), (16, 48, 3, 1, 2, 5, 6),
          (64, 64, 3, 1, 3, 8, 8), (16, 3, 1, 0, 2, 7, 9), (16, 32, 3, 1, 2, 70, 66), (16, 16, 3, 0, 1, 6, 11),
          (256, 256, 3, 1, 2, 8, 8)]  # the last: the weight gradient's output channels in blocks


@pytest.mark.parametrize("cin, cout, k, pad, n, h, w", LAYERS)
@pytest.mark.parametrize("input_grad", [True, False])
def test_conv2d_with_the_kernels_matches_conv2d_with_blas(cin, cout, k, pad, n, h, w, input_grad):
    rng = np.random.default_rng(cin + cout + h)
    conv = Conv2d(cin, cout, k, padding=pad, method="shifted")
    x = np.ascontiguousarray(rng.standard_normal((n, h, w, cin), dtype=np.float32)).transpose(0, 3, 1, 2)
    ho, wo = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    dout = rng.standard_normal((n, cout, ho, wo), dtype=np.float32)
    with compiled(False):
        reference = conv_step(conv, x, dout, input_grad)
    with compiled(True):
        assert conv._direct() == (cin % 16 == 0 and cout % 16 == 0)
        got = conv_step(conv, x, dout, input_grad)
    for mine, theirs in zip(got, reference):
        if theirs is None:
            assert mine is None
        else:
            close(mine, theirs)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("cin, cout, size", [(16, 32, 70), (256, 256, 8)])
def test_results_do_not_depend_on_the_number_of_threads(threads, cin, cout, size):
    """Blocks of rows (wide images) or of output channels (the deep layers: more weights than rows)
    depend on the sizes only, and each output's sum runs in a fixed order."""
    rng = np.random.default_rng(0)
    conv = Conv2d(cin, cout, 3, padding=1, method="shifted")
    x = np.ascontiguousarray(rng.standard_normal((2, size, size - 4, cin), dtype=np.float32)).transpose(0, 3, 1, 2)
    dout = rng.standard_normal((2, cout, size, size - 4), dtype=np.float32)
    before = parallel.get_num_threads()
    try:
        parallel.set_num_threads(1)
        one = conv_step(conv, x, dout)
        parallel.set_num_threads(threads)
        many = conv_step(conv, x, dout)
    finally:
        parallel.set_num_threads(before)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)
