"""ConvTranspose2d: forward against a gather-loop reference, finite-difference gradients, dtypes."""
import numpy as np
import pytest

from tinyunet.nn import naive as ref
from tinyunet import backend
from tinyunet.gradcheck import check_module
from tinyunet.nn import Conv2d, ConvTranspose2d

pytestmark = pytest.mark.usefixtures("numpy_backend", "accel_mode")

CASES = [(k, s, p) for k in (1, 2, 3, 5) for s in (1, 2) for p in (0, 1, 2)]
IDS = [f"k{k}-s{s}-p{p}" for k, s, p in CASES]
H, W = 5, 7  # odd, non-square; every case above has a non-empty output for these


def out_len(size, k, s, p):
    return (size - 1) * s - 2 * p + k


def make(cin, cout, k, s, p, bias=True, dtype=np.float64, seed=0):
    backend.seed(seed)
    up = ConvTranspose2d(cin, cout, k, stride=s, padding=p, bias=bias).to(dtype)
    if bias:
        up.bias.data = np.linspace(-1, 1, cout).astype(dtype)
    return up


@pytest.mark.parametrize("k,s,p", CASES, ids=IDS)
def test_forward_matches_loop_reference(k, s, p):
    assert out_len(H, k, s, p) > 0 and out_len(W, k, s, p) > 0
    x = np.random.default_rng(1).standard_normal((2, 3, H, W))
    up = make(3, 4, k, s, p)
    assert up.weight.shape == (3, 4, k, k)  # PyTorch layout: (in, out, kh, kw)
    out = up.forward(x)
    assert out.shape == (2, 4, out_len(H, k, s, p), out_len(W, k, s, p))
    np.testing.assert_allclose(out, ref.conv_transpose2d(x, up.weight.data, up.bias.data, s, p), rtol=1e-10, atol=1e-12)


def test_unet_upsampling_doubles_size_without_bias():
    x = np.random.default_rng(2).standard_normal((2, 4, 3, 5))
    up = make(4, 2, 2, 2, 0, bias=False)
    assert up.bias is None
    out = up.forward(x)
    assert out.shape == (2, 2, 6, 10)
    np.testing.assert_allclose(out, ref.conv_transpose2d(x, up.weight.data, None, 2, 0), rtol=1e-10, atol=1e-12)


def test_is_the_adjoint_of_conv2d():
    # <conv(x), y> == <x, convT(y)> for the same weight (conv weight (o, c) = convT weight (c, o))
    rng = np.random.default_rng(3)
    backend.seed(0)
    conv = Conv2d(3, 2, 3, stride=2, padding=1, bias=False).double()
    up = ConvTranspose2d(2, 3, 3, stride=2, padding=1, bias=False).double()
    up.weight.data = conv.weight.data.copy()
    x = rng.standard_normal((2, 3, 7, 7))
    y = rng.standard_normal((2, 2, 4, 4))
    lhs = float((conv.forward(x) * y).sum())
    rhs = float((x * up.forward(y)).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("k,s,p", CASES, ids=IDS)
def test_gradients_match_finite_differences(k, s, p):
    # linear in x and in w: no kinks to avoid
    assert out_len(H, k, s, p) > 0 and out_len(W, k, s, p) > 0
    x = np.random.default_rng(5).standard_normal((2, 2, H, W))
    up = make(2, 3, k, s, p, seed=k * 100 + s * 10 + p)
    errors = check_module(up, x)
    assert set(errors) == {"input0", "weight", "bias"}
    assert max(errors.values()) <= 1e-6, errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(dtype):
    x = np.random.default_rng(6).standard_normal((2, 3, H, W)).astype(dtype)
    up = make(3, 4, 3, 2, 1, dtype=dtype)
    out = up.forward(x)
    assert out.dtype == dtype
    dx = up.backward(np.ones(out.shape, dtype=dtype))
    assert dx.dtype == dtype and dx.shape == x.shape
    assert up.weight.grad.dtype == dtype and up.bias.grad.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-10
    expected = ref.conv_transpose2d(x.astype(np.float64), up.weight.data.astype(np.float64),
                                    up.bias.data.astype(np.float64), 2, 1)
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
