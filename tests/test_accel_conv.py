"""Every accelerated Conv2d (tinyunet/accel) against the reference layer (tinyunet/nn/conv.py), forward
and backward, float32 and float64, on shapes that reach each implementation's branches and each
threshold of its plan on both sides (odd sizes, strides, paddings, kernels 1/2/3/5, batch 1)."""
import numpy as np
import pytest

from accel_check import AcceleratedByTheLayer, assert_same, step, tolerance
from tinyunet import backend
from tinyunet.accel import compiled_loops, parallel
from tinyunet.accel.choose import SPLIT_WEIGHT_GRAD_ROWS
from tinyunet.accel.conv import Im2colConv, Im2rowConv, add_channel_vector
from tinyunet.accel.direct import DirectConv
from tinyunet.accel.shifted import ShiftedConv
from tinyunet.accel.winograd import WinogradConv
from tinyunet.nn import Conv2d

pytestmark = pytest.mark.usefixtures("numpy_backend")


def layer_and_data(cin, cout, k, stride, padding, n, h, w, dtype, bias=True, seed=0, channels_last=False):
    backend.seed(seed)
    layer = Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias).to(dtype)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((n, cin, h, w)).astype(dtype)
    if channels_last:   # what the accelerated layers hand each other
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    kh, kw = layer.kernel_size
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    dout = rng.standard_normal((n, cout, ho, wo)).astype(dtype)
    return layer, x, dout


def check(implementation, layer, x, dout, input_grad=True):
    layer.input_grad = input_grad
    expected = step(layer, (x,), dout)
    got = step(layer, (x,), dout, implementation)
    assert_same(got, expected, tolerance(x.dtype))
    return got


# kernel, stride, padding for the unfolding methods: everything the layer takes
GRID = [(k, s, p) for k in (1, 2, 3, 5) for s in (1, 2) for p in (0, 1, 2)]


@pytest.mark.parametrize("implementation", [Im2colConv, Im2rowConv])
@pytest.mark.parametrize("k, s, p", GRID)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_unfolding_methods_equal_the_reference(implementation, k, s, p, dtype):
    layer, x, dout = layer_and_data(3, 5, k, s, p, n=2, h=9, w=7, dtype=dtype, seed=k + 10 * s + 100 * p)
    check(implementation(layer), layer, x, dout)


@pytest.mark.parametrize("implementation", [Im2colConv, Im2rowConv])
@pytest.mark.parametrize("n, h, w, cin", [(1, 11, 6, 3), (8, 33, 30, 16)])  # batch 1; enough work to split (2**24)
def test_unfolding_methods_on_one_image_and_on_blocks_of_images(implementation, n, h, w, cin):
    layer, x, dout = layer_and_data(cin, 16, 3, 1, 1, n, h, w, np.float32, channels_last=True)
    check(implementation(layer), layer, x, dout)
    check(implementation(layer), layer, x, dout, input_grad=False)


# ShiftedConv's plan: every combination of its three switches
PLANS = [dict(split_weight_grad=split, join_rows=join, blas_adds=adds)
         for split in (False, True) for join in (False, True) for adds in (False, True) if split or not join]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "-".join(k for k, v in p.items() if v) or "plain")
@pytest.mark.parametrize("k, p", [(1, 0), (2, 1), (3, 0), (3, 1), (3, 2), (5, 2), ((3, 2), 1)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_shifted_products_equal_the_reference(plan, k, p, dtype):
    layer, x, dout = layer_and_data(8, 5, k, 1, p, n=3, h=7, w=9, dtype=dtype)
    check(ShiftedConv(layer, **plan), layer, x, dout)


@pytest.mark.parametrize("cin, join", [(8, True), (16, True), (24, False)])
def test_shifted_weight_gradient_split_into_many_blocks_of_rows(cin, join):
    """Above SPLIT_WEIGHT_GRAD_ROWS rows and 2**24 multiply-adds: partial sums over blocks of rows that
    cut images apart (each block pads only its own lines), from joined rows and from plain products."""
    layer, x, dout = layer_and_data(cin, 16, 3, 1, 1, n=2, h=90, w=91, dtype=np.float32, channels_last=True)
    rows = 2 * 92 * 93
    assert rows >= SPLIT_WEIGHT_GRAD_ROWS and len(parallel.row_blocks(rows, 9 * cin * 16)) > 1
    check(ShiftedConv(layer, split_weight_grad=True, join_rows=join), layer, x, dout)


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_padded_lines_are_the_lines_of_the_padded_rows(padding):
    """The split weight gradient pads only the lines a block reads: any range of lines, also across
    images and through the padding lines, equals the same lines of the whole padded copy."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, 4, 2))                       # (N, H, W, C)
    shifted = ShiftedConv(Conv2d(2, 3, 3, padding=padding))
    whole = shifted._padded_rows(x)
    hp, wp = 5 + 2 * padding, 4 + 2 * padding
    for first, last in [(0, 1), (0, 3 * hp), (1, hp + 2), (hp - 1, 2 * hp + 1), (2 * hp, 3 * hp), (1, 3 * hp - 1)]:
        np.testing.assert_array_equal(shifted._padded_lines(x, first, last), whole[first * wp:last * wp])
    # without padding (a 1x1 conv such as the U-Net's head) the lines are x's own memory: no copy
    assert np.shares_memory(shifted._padded_lines(x, 1, 4), x) == (padding == 0)


@pytest.mark.parametrize("n, h, w, cin, cout", [(2, 6, 8, 5, 3), (1, 10, 4, 3, 7), (8, 32, 32, 64, 64),
                                                 (2, 16, 16, 128, 64)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_winograd_equals_the_reference(n, h, w, cin, cout, dtype):
    layer, x, dout = layer_and_data(cin, cout, 3, 1, 1, n, h, w, dtype)
    assert WinogradConv.accepts(layer, x)
    check(WinogradConv(layer), layer, x, dout)
    check(WinogradConv(layer), layer, x, dout, input_grad=False)


def test_winograd_declines_what_it_cannot_compute():
    layer, x, _ = layer_and_data(4, 4, 3, 1, 1, 1, 6, 7, np.float64)          # odd width
    assert not WinogradConv.accepts(layer, x)
    for k, s, p in [(3, 2, 1), (3, 1, 0), (5, 1, 2)]:
        layer, x, _ = layer_and_data(4, 4, k, s, p, 1, 8, 8, np.float64)
        assert not WinogradConv.accepts(layer, x)


numba = pytest.mark.skipif(not compiled_loops.available(), reason="Numba is not installed")
# (Cin, Cout, kernel, padding, N, H, W): the U-Net's 3x3 layers in small, odd sizes, the 1x1 head,
# an image's channels (dx on 16 channels, 13 of them zero), 5x5, padding 2 on 3x3 (border pixels that
# see no tap), the deep layers (more weights than rows), and the top level above the row threshold
DIRECT_LAYERS = [(16, 16, 3, 1, 2, 9, 7), (32, 16, 3, 1, 1, 12, 12), (16, 48, 3, 1, 2, 5, 6),
                 (64, 64, 3, 1, 3, 8, 8), (16, 16, 1, 0, 2, 7, 9), (16, 16, 3, 0, 1, 6, 11),
                 (256, 256, 3, 1, 1, 8, 8), (3, 16, 3, 1, 2, 9, 7), (4, 32, 3, 1, 1, 40, 30),
                 (16, 32, 5, 2, 2, 9, 8), (16, 16, 3, 2, 1, 6, 7), (16, 16, 3, 1, 2, 96, 96), (3, 16, 3, 1, 2, 96, 90),
                 (16, 16, 1, 1, 1, 5, 6), (16, 32, 3, 3, 1, 5, 4)]   # padding beyond the kernel: whole rings of no tap
DIRECT_PLANS = [dict(split_weight_grad=split, share_channels=share)
                for split in (False, True) for share in ((False, False), (True, True), (False, True), (True, False))]


@numba
@pytest.mark.parametrize("cin, cout, k, pad, n, h, w", DIRECT_LAYERS)
@pytest.mark.parametrize("plan", DIRECT_PLANS, ids=lambda p: f"split{int(p['split_weight_grad'])}-"
                                                            f"share{''.join(str(int(s)) for s in p['share_channels'])}")
def test_direct_kernels_equal_the_reference(cin, cout, k, pad, n, h, w, plan):
    layer, x, dout = layer_and_data(cin, cout, k, 1, pad, n, h, w, np.float32, channels_last=True)
    assert DirectConv.accepts(layer, x)
    check(DirectConv(layer, **plan), layer, x, dout)
    if plan["split_weight_grad"]:
        check(DirectConv(layer, **plan), layer, x, dout, input_grad=False)


@numba
def test_direct_kernels_above_the_row_threshold_split_the_weight_gradient_into_blocks():
    """The default plan of the U-Net's first levels: more rows than SPLIT_WEIGHT_GRAD_ROWS, the
    partial sums of many row blocks added (a block that skipped a segment was once 1-9% off, silently)."""
    from tinyunet.accel.choose import conv2d as choose_conv
    for cin, n, size in [(16, 2, 96), (3, 4, 128)]:
        layer, x, dout = layer_and_data(cin, 16, 3, 1, 1, n, size, size, np.float32, channels_last=True)
        chosen = choose_conv(layer, x)
        assert isinstance(chosen, DirectConv) and chosen.split_weight_grad and n * size ** 2 >= SPLIT_WEIGHT_GRAD_ROWS
        assert len(parallel.row_blocks(n * size ** 2, 9 * cin * 16)) > 1
        check(chosen, layer, x, dout, input_grad=cin != 3)


@numba
def test_direct_kernels_decline_what_they_cannot_read():
    for cin, cout, dtype, stride in [(16, 24, np.float32, 1), (24, 16, np.float32, 1), (16, 16, np.float64, 1),
                                     (16, 16, np.float32, 2)]:
        layer, x, _ = layer_and_data(cin, cout, 3, stride, 1, 1, 8, 8, dtype)
        assert not DirectConv.accepts(layer, x)
    layer, x, _ = layer_and_data(16, 16, 3, 1, 1, 1, 8, 8, np.float32)
    assert DirectConv.accepts(layer, x)
    with pytest.MonkeyPatch.context() as patch:      # Numba's code switched off: the kernels decline
        patch.setattr(compiled_loops, "_enabled", False)
        assert not DirectConv.accepts(layer, x)


@numba
def test_direct_kernels_take_a_float64_gradient_in_the_layers_float32():
    layer, x, dout = layer_and_data(16, 16, 3, 1, 1, 2, 7, 9, np.float32, channels_last=True)
    expected = step(layer, (x,), dout)
    got = step(layer, (x,), dout.astype(np.float64), DirectConv(layer))
    assert got["dx"][0].dtype == np.float32
    assert_same(got, expected, 2e-5)


@numba
def test_direct_sums_refuse_arrays_the_kernels_cannot_read():
    """The kernels check no bounds, so the layer code refuses arrays they cannot read (instead of
    reading past them)."""
    from tinyunet.accel import direct_kernels
    from tinyunet.accel.direct import direct_sums
    a, w = np.zeros((40, 16), np.float32), np.zeros((9, 16, 32), np.float32)
    segments = direct_kernels.clipped_segments(1, 5, 6, 5, 6, tuple((i - 1, j - 1) for i in range(3) for j in range(3)))
    for out, rows in [(np.zeros((30, 32)), a), (np.zeros((30, 32), np.float32), a[::2]),
                      (np.zeros((30, 24), np.float32), a)]:
        with pytest.raises(ValueError):
            direct_sums(out, rows, [0] * 9, w, segments, False)


@pytest.mark.parametrize("implementation", ["im2col", "im2row", "shifted", "winograd", "direct"])
@pytest.mark.parametrize("threads", [1, 3])
def test_results_do_not_depend_on_the_number_of_threads(implementation, threads):
    """Blocks of rows, images or output channels depend on the sizes only, and each sum runs in a
    fixed order: the same bits on 1, 2 or 3 threads."""
    if implementation == "direct" and not compiled_loops.available():
        pytest.skip("Numba is not installed")
    cin = {"im2col": 3, "direct": 16}.get(implementation, 64)
    layer, x, dout = layer_and_data(cin, 64, 3, 1, 1, 4, 32, 32, np.float32, channels_last=True)
    make = {"im2col": Im2colConv, "im2row": Im2rowConv, "shifted": lambda l: ShiftedConv(l, split_weight_grad=True),
            "winograd": WinogradConv, "direct": lambda l: DirectConv(l, split_weight_grad=True)}[implementation]
    before = parallel.get_num_threads()
    try:
        parallel.set_num_threads(2)
        two = step(layer, (x,), dout, make(layer))
        parallel.set_num_threads(threads)
        other = step(layer, (x,), dout, make(layer))
    finally:
        parallel.set_num_threads(before)
    for key in two:
        for a, b in (zip(two[key], other[key]) if key == "dx" else [(two[key], other[key])]):
            np.testing.assert_array_equal(a, b)


def test_add_channel_vector_adds_in_place_for_every_layout():
    """Contiguous rows (added as tiled rows), a view that skips a padding border (the border must stay
    untouched), and NCHW memory (the plain broadcast) all get v added to every pixel, in place."""
    v = np.array([1.0, -2.0, 3.5])
    contiguous = np.zeros((2, 5, 7, 3))
    padded = np.zeros((2, 6, 9, 3))
    nchw_memory = np.zeros((2, 3, 5, 7)).transpose(0, 2, 3, 1)
    for a in (contiguous, padded[:, :5, :7], nchw_memory):
        add_channel_vector(a, v)
        np.testing.assert_array_equal(a, np.broadcast_to(v, a.shape))
    assert not padded[:, 5:].any() and not padded[:, :, 7:].any()


def test_the_default_unets_convolutions_as_the_chooser_picks_them():
    """The convolutions `tinyunet train` runs by default (the U-Net of 16 base channels, depth 4, batch 8
    of 128 x 128, float32, channels-last as the layers hand them on): each one with whatever the chooser
    picks for it, against the reference layer. The plans above are forced one by one; this is the mix
    that actually runs, including the 1x1 head (3 outputs: the kernels decline it)."""
    from tinyunet.models import UNet

    backend.seed(0)
    model = UNet()
    shapes = set()                       # (cin, cout, k, padding, h, w) of every convolution's input

    def recording(layer):
        forward = layer.forward
        return lambda a: shapes.add((layer.in_channels, layer.out_channels, layer.kernel_size[0], layer.padding,
                                     *a.shape[2:])) or forward(a)

    for m in model.modules():
        if isinstance(m, Conv2d):
            m.forward = recording(m)
    before = backend.set_acceleration(False)
    try:
        model.eval().forward(np.zeros((1, 3, 128, 128), np.float32))
    finally:
        backend.set_acceleration(before)
    chosen = set()
    for cin, cout, k, p, h, w in sorted(shapes):
        layer, x, dout = layer_and_data(cin, cout, k, 1, p, 8, h, w, np.float32, channels_last=True)
        expected = step(layer, (x,), dout)
        got = step(layer, (x,), dout, AcceleratedByTheLayer(layer))
        chosen.add(type(layer.fast).__name__)
        assert_same(got, expected, tolerance(np.float32))
    assert (16, 3, 1, 0, 128, 128) in shapes and len(shapes) >= 10, sorted(shapes)
    assert len(chosen) >= 2, chosen
