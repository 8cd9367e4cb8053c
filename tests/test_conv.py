"""Conv2d: forward against the six-loop reference (nn/naive.py), gradients against finite differences,
dtypes, im2col and col2im. Every test runs twice: the reference layer alone, and as the CPU
acceleration runs it (tests/test_accel_conv.py forces each accelerated implementation in turn)."""
import numpy as np
import pytest

from tinyunet.nn import naive as ref
from tinyunet import backend
from tinyunet.gradcheck import check_module
from tinyunet.nn import Conv2d
from tinyunet.nn.conv import col2im, im2col

pytestmark = pytest.mark.usefixtures("numpy_backend", "accel_mode")


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


@pytest.mark.parametrize("k,s,p", CASES, ids=IDS)
def test_gradients_match_finite_differences(k, s, p):
    # convolution is linear in x and in w: no kinks, any random input is fine
    rng = np.random.default_rng(5)
    conv = make(2, 3, k, s, p, seed=k * 100 + s * 10 + p)
    x = rng.standard_normal((2, 2, 7, 6))
    errors = check_module(conv, x)
    assert set(errors) == {"input0", "weight", "bias"}
    assert max(errors.values()) <= 1e-6, errors


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


@pytest.mark.parametrize("k, s, p", [(3, 1, 1), (2, 2, 0), (3, 2, 1), (5, 1, 2), (1, 1, 0)])
def test_im2col_columns_are_the_patches(k, s, p):
    """Column y*Wout + x holds the patch under output pixel (y, x), row c*k*k + i*k + j: checked
    entry by entry against the padded image, and col2im is its adjoint (<im2col(x), C> = <x, col2im(C)>)."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 7, 6))
    cols = im2col(x, k, k, s, p)
    ho, wo = ref.out_size(7, k, s, p), ref.out_size(6, k, s, p)
    assert cols.shape == (2, 3 * k * k, ho * wo)
    xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    for n, c, i, j, y, xx in [(0, 0, 0, 0, 0, 0), (1, 2, k - 1, k - 1, ho - 1, wo - 1), (1, 1, k // 2, 0, ho // 2, wo - 1)]:
        assert cols[n, c * k * k + i * k + j, y * wo + xx] == xpad[n, c, y * s + i, xx * s + j]
    other = rng.standard_normal(cols.shape)
    assert np.isclose((cols * other).sum(), (x * col2im(other, x.shape, k, k, s, p)).sum())


def test_col2im_counts_how_many_patches_hold_each_pixel():
    counts = col2im(np.ones((1, 9, 16)), (1, 1, 4, 4), 3, 3, 1, 1)[0, 0]
    np.testing.assert_array_equal(counts, [[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]])


def test_the_image_layer_returns_no_input_gradient_when_asked():
    rng = np.random.default_rng(13)
    conv = make(3, 4, 3, 1, 1)
    conv.input_grad = False
    x = rng.standard_normal((2, 3, 6, 6))
    out = conv.forward(x)
    assert conv.backward(np.ones_like(out)) is None
    np.testing.assert_allclose(conv.bias.grad, np.full(4, 72.0))
