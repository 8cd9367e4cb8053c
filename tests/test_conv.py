"""Conv2d: forward against a six-loop reference, gradients against finite differences, dtypes."""
import numpy as np
import pytest

import reference as ref
from tinyunet import backend
from tinyunet.gradcheck import check_module
from tinyunet.nn import Conv2d
from tinyunet.nn import conv as conv_module
from tinyunet.nn.conv import conv2d_naive

pytestmark = pytest.mark.usefixtures("numpy_backend")


@pytest.fixture(autouse=True, params=["shifted", "im2row", "im2col"])
def conv_method(request, monkeypatch):
    """Every test runs with each method: the layer picks im2col for few input channels and im2row
    for small outputs only, and the test images are small with few channels, so each method is
    forced once by moving the limits (strided convolutions never use the shifted products)."""
    monkeypatch.setattr(conv_module, "_MAX_IM2COL_CHANNELS", 10 ** 9 if request.param == "im2col" else 0)
    monkeypatch.setattr(conv_module, "_MAX_IM2ROW_PIXELS", 0 if request.param == "shifted" else 10 ** 9)
    return request.param

# every kernel / stride / padding combination the issue asks for (odd, non-square inputs below)
CASES = [(k, s, p) for k in (1, 2, 3, 5) for s in (1, 2) for p in (0, 1, 2)]
IDS = [f"k{k}-s{s}-p{p}" for k, s, p in CASES]


def make(cin, cout, k, s, p, bias=True, dtype=np.float64, seed=0):
    backend.seed(seed)
    conv = Conv2d(cin, cout, k, stride=s, padding=p, bias=bias).to(dtype)
    if bias:  # non-zero, distinct biases so a misplaced bias shows
        conv.bias.data = np.linspace(-1, 1, cout).astype(dtype)
    return conv


@pytest.mark.parametrize("k,s,p", CASES, ids=IDS)
def test_forward_matches_loop_reference(k, s, p):
    rng = np.random.default_rng(1)
    conv = make(3, 4, k, s, p)
    x = rng.standard_normal((2, 3, 7, 9))
    out = conv.forward(x)
    expected = ref.conv2d(x, conv.weight.data, conv.bias.data, s, p)
    assert out.shape == expected.shape == (2, 4, ref.out_size(7, k, s, p), ref.out_size(9, k, s, p))
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("s,p", [(1, 0), (2, 1)])
def test_forward_without_bias_and_nonsquare_kernel(s, p):
    rng = np.random.default_rng(2)
    backend.seed(3)
    conv = Conv2d(2, 3, (3, 1), stride=s, padding=p, bias=False).double()
    assert conv.bias is None and conv.weight.shape == (3, 2, 3, 1)
    x = rng.standard_normal((2, 2, 7, 5))
    np.testing.assert_allclose(conv.forward(x), ref.conv2d(x, conv.weight.data, None, s, p), rtol=1e-10, atol=1e-12)


def test_package_naive_conv_agrees_with_reference():
    rng = np.random.default_rng(4)
    x, w, b = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 3, 3, 3)), rng.standard_normal(2)
    np.testing.assert_allclose(conv2d_naive(x, w, b, 2, 1), ref.conv2d(x, w, b, 2, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k,s,p", CASES, ids=IDS)
def test_gradients_match_finite_differences(k, s, p):
    # convolution is linear in x and in w: no kinks, any random input is fine
    rng = np.random.default_rng(5)
    conv = make(2, 3, k, s, p, seed=k * 100 + s * 10 + p)
    x = rng.standard_normal((2, 2, 7, 6))
    errors = check_module(conv, x)
    assert set(errors) == {"input0", "weight", "bias"}
    assert max(errors.values()) <= 1e-6, errors


@pytest.mark.parametrize("stride", [1, 2])
def test_keep_cols_false_gives_same_gradients(stride):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 7, 7))
    dout = rng.standard_normal((2, 4, 7, 7) if stride == 1 else (2, 4, 4, 4))
    results = []
    for keep in (True, False):
        backend.seed(7)
        conv = Conv2d(3, 4, 3, stride=stride, padding=1, keep_cols=keep).double()
        out = conv.forward(x)
        dx = conv.backward(dout)
        results.append((out, dx, conv.weight.grad.copy(), conv.bias.grad.copy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_bias_gradient_is_sum_of_dout():
    # hand formula: d(sum(out * g))/d bias[o] = sum_{n,y,x} g[n,o,y,x]
    rng = np.random.default_rng(8)
    conv = make(2, 3, 3, 1, 1)
    x = rng.standard_normal((2, 2, 5, 5))
    g = rng.standard_normal((2, 3, 5, 5))
    conv.forward(x)
    conv.backward(g)
    np.testing.assert_allclose(conv.bias.grad, g.sum(axis=(0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(dtype):
    rng = np.random.default_rng(9)
    conv = make(3, 4, 3, 2, 1, dtype=dtype)
    x = rng.standard_normal((2, 3, 7, 9)).astype(dtype)
    out = conv.forward(x)
    assert out.dtype == dtype
    dx = conv.backward(np.ones(out.shape, dtype=dtype))
    assert dx.dtype == dtype
    assert conv.weight.grad.dtype == dtype and conv.bias.grad.dtype == dtype
    assert conv.weight.data.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(out, ref.conv2d(x.astype(np.float64), conv.weight.data.astype(np.float64),
                                               conv.bias.data.astype(np.float64), 2, 1), rtol=tol, atol=tol)


def test_default_init_is_float32_pytorch_bound():
    backend.seed(0)
    conv = Conv2d(4, 8, 3)
    bound = 1 / np.sqrt(4 * 3 * 3)
    assert conv.weight.data.dtype == np.float32 and conv.weight.shape == (8, 4, 3, 3)
    assert np.abs(conv.weight.data).max() <= bound and np.abs(conv.weight.data).max() > 0.8 * bound
    assert conv.weight.grad.shape == conv.weight.shape and not conv.weight.grad.any()


@pytest.mark.parametrize("channels", [8, 24])
@pytest.mark.parametrize("kernel, padding", [(3, 1), (5, 2), ((3, 2), 1)])
def test_weight_gradient_of_large_inputs_matches_an_independent_sum(kernel, padding, channels):
    """Big enough (>= 16384 padded rows) for the blocked weight gradient of
    Conv2d._weight_grad_shifted, from joined rows (8 input channels) and from plain products (24);
    checked against the definition dweight[o, c, i, j] = sum_{n, y, x} dout[n, o, y, x] * xpad[n, c, y + i, x + j]."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, channels, 90, 90))
    backend.seed(3)
    conv = Conv2d(channels, 4, kernel, padding=padding, bias=False).double()
    out = conv.forward(x)
    assert 2 * (90 + 2 * padding) ** 2 >= 16384
    dout = rng.standard_normal(out.shape)
    conv.backward(dout)
    kh, kw = conv.kernel_size
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = out.shape[2:]
    expected = np.empty_like(conv.weight.data)
    for i in range(kh):
        for j in range(kw):
            expected[:, :, i, j] = np.einsum("noyx,ncyx->oc", dout, xpad[:, :, i:i + ho, j:j + wo])
    np.testing.assert_allclose(conv.weight.grad, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_padded_lines_are_the_lines_of_the_padded_rows(padding):
    """The weight gradient pads only the lines a block reads: any range of lines, also across
    images and through the padding lines, equals the same lines of the whole padded copy."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, 4, 2))                       # (N, H, W, C)
    conv = Conv2d(2, 3, 3, padding=padding)
    whole = conv._padded_rows(x)
    hp, wp = 5 + 2 * padding, 4 + 2 * padding
    for first, last in [(0, 1), (0, 3 * hp), (1, hp + 2), (hp - 1, 2 * hp + 1), (2 * hp, 3 * hp), (1, 3 * hp - 1)]:
        np.testing.assert_array_equal(conv._padded_lines(x, first, last), whole[first * wp:last * wp])
    # without padding (a 1x1 conv such as the U-Net's head) the lines are x's own memory: no copy
    assert np.shares_memory(conv._padded_lines(x, 1, 4), x) == (padding == 0)


def test_method_depends_on_channels_and_output_size(conv_method, monkeypatch):
    """The default limits with BLAS's products: up to 4 input channels im2col; else outputs up to
    16x16 pixels im2row, larger ones the shifted products; other strides im2row. With the direct
    kernels (Numba) an image's channels go to them too (tests/test_direct_conv.py)."""
    from conftest import compiled_code
    monkeypatch.setattr(conv_module, "_MAX_IM2ROW_PIXELS", 256)
    monkeypatch.setattr(conv_module, "_MAX_IM2COL_CHANNELS", 4)
    conv = Conv2d(5, 2, 3, padding=1)
    with compiled_code(False):
        assert conv._method(8, 16, 16) == conv._method(8, 8, 32) == "im2row"
        assert conv._method(8, 17, 16) == conv._method(8, 32, 32) == "shifted"
        assert Conv2d(5, 2, 3, stride=2, padding=1)._method(8, 64, 64) == "im2row"
        assert Conv2d(3, 16, 3, padding=1)._method(8, 128, 128) == Conv2d(4, 2, 3, stride=2)._method(8, 9, 9) == "im2col"


def test_add_channel_vector_adds_in_place_for_every_layout(conv_method):
    """Contiguous rows (added as tiled rows), a view that skips a padding border (the border must stay
    untouched), and NCHW memory (the plain broadcast) all get v added to every pixel, in place."""
    from tinyunet.nn.conv import add_channel_vector
    v = np.array([1.0, -2.0, 3.5])
    contiguous = np.zeros((2, 5, 7, 3))
    padded = np.zeros((2, 6, 9, 3))
    nchw_memory = np.zeros((2, 3, 5, 7)).transpose(0, 2, 3, 1)
    for a in (contiguous, padded[:, :5, :7], nchw_memory):
        add_channel_vector(a, v)
        np.testing.assert_array_equal(a, np.broadcast_to(v, a.shape))
    assert not padded[:, 5:].any() and not padded[:, :, 7:].any()
