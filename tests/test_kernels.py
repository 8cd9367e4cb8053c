"""The compiled loops of tinyunet/kernels.py (Numba): each against NumPy formulas, the layers that use
them against their NumPy passes, gradients by finite differences, and when they are (not) used."""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

from conftest import compiled_code as compiled_loops  # noqa: E402
from tinyunet.accel import compiled_loops as kernels, parallel  # noqa: E402
from tinyunet.gradcheck import numerical_gradient, relative_error  # noqa: E402
from tinyunet.nn import BatchNorm2d, ReLU  # noqa: E402

pytestmark = pytest.mark.usefixtures("numpy_backend")


def channels_last(x):
    """The same (N, C, H, W) numbers with channels-last memory."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def padded_view(x, fill=np.nan):
    """x as a convolution hands it over: an NCHW-shaped view of channels-last rows with a border of 1
    row and 2 columns after each image's pixels. The border is NaN: a loop that reads it poisons its result."""
    n, c, h, w = x.shape
    buf = np.full((n, h + 1, w + 2, c), fill, dtype=x.dtype)
    buf[:, :h, :w] = x.transpose(0, 2, 3, 1)
    return buf[:, :h, :w].transpose(0, 3, 1, 2)


def test_pixels_gives_the_memory_of_a_padded_view_and_refuses_nchw():
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 6))
    view = padded_view(x)
    pixels = kernels._pixels(view)
    assert pixels.shape == (3, 6, 8, 4) and pixels.flags.c_contiguous   # (N, Hb, Wb, C): the full lines
    np.testing.assert_array_equal(pixels[:, :5, :6], x.transpose(0, 2, 3, 1))
    assert np.shares_memory(pixels, view)
    compact = channels_last(x)
    assert kernels._pixels(compact).base is not None and np.shares_memory(kernels._pixels(compact), compact)
    assert kernels._pixels(x) is None                           # NCHW memory: the loops do not apply
    assert kernels._pixels(x[:, :, :, ::2]) is None             # a stride the loops cannot take
    assert kernels.usable(view, compact) and not kernels.usable(view, x)
    assert not kernels.usable(x.reshape(3, 4, 30))              # not 4-D


@pytest.mark.parametrize("make", [channels_last, padded_view])
def test_each_loop_computes_its_formula(make):
    rng = np.random.default_rng(1)
    x64 = rng.standard_normal((3, 5, 4, 7)) * 3 + 100           # a mean far from 0: E[x^2] - E[x]^2 would cancel
    d64 = rng.standard_normal(x64.shape)
    x, d = make(x64), make(d64)
    mean, var = kernels.channel_mean_var(x)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-14)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=1e-11)
    mean_c, scale, beta = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal(5)
    centered, out = kernels.normalise(x, mean_c, scale, beta)
    want_centered = x64 - mean_c[:, None, None]
    np.testing.assert_allclose(centered, want_centered.transpose(0, 2, 3, 1), rtol=1e-15, atol=1e-13)
    np.testing.assert_allclose(out, (want_centered * scale[:, None, None] + beta[:, None, None]).transpose(0, 2, 3, 1),
                               rtol=1e-14, atol=1e-13)
    s, q = kernels.grad_sums(d, centered)
    np.testing.assert_allclose(s, d64.sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(q, (d64 * want_centered).sum(axis=(0, 2, 3)), rtol=1e-12)
    a, b, shift = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal(5)
    dx = kernels.affine_grad(d, centered, a, b, shift)
    per = lambda v: v[:, None, None]  # noqa: E731
    np.testing.assert_allclose(dx, per(a) * d64 + per(b) * want_centered + per(shift), rtol=1e-13, atol=1e-13)
    y = kernels.relu(make(x64 - 100))
    np.testing.assert_array_equal(y, np.maximum(x64 - 100, 0))
    np.testing.assert_array_equal(kernels.relu_backward(d, make(np.asarray(y))), np.where(y > 0, d64, 0))


def test_relu_keeps_nan_as_numpy_does():
    x = channels_last(np.array([np.nan, -1.0, 0.0, 2.0]).reshape(1, 4, 1, 1))
    np.testing.assert_array_equal(kernels.relu(x).ravel(), [np.nan, 0.0, 0.0, 2.0])


def layer_results(layer, x, dout, training):
    layer.train(training)
    out = layer.forward(x)
    dx = layer.backward(dout)
    return [np.array(out), np.array(dx)] + [p.grad.copy() for p in layer.parameters()]


def make_bn(c, dtype):
    bn = BatchNorm2d(c).to(dtype)
    rng = np.random.default_rng(2)
    bn.weight.data = rng.uniform(0.5, 2.0, c).astype(dtype)
    bn.bias.data = rng.standard_normal(c).astype(dtype)
    bn.running_mean, bn.running_var = np.linspace(-1, 1, c).astype(dtype), np.linspace(0.5, 2, c).astype(dtype)
    return bn


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_with_the_loops_equals_its_numpy_passes(dtype, training):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 6, 9, 11)) * 2 + 1).astype(dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    results = {}
    for loops in (True, False):
        with compiled_loops(loops):
            bn = make_bn(6, dtype)
            results[loops] = layer_results(bn, padded_view(x), padded_view(dout), training) + [bn.running_mean,
                                                                                               bn.running_var]
    for with_loops, with_numpy in zip(results[True], results[False]):
        assert with_loops.dtype == with_numpy.dtype == dtype
        np.testing.assert_allclose(with_loops, with_numpy, rtol=tol, atol=tol)
    assert results[True][0].transpose(0, 2, 3, 1).flags.c_contiguous      # the output stays channels-last


def test_batchnorm_loops_are_used_for_channels_last_input(monkeypatch):
    calls = []
    for name in ("channel_mean_var", "normalise", "grad_sums", "affine_grad"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x = channels_last(np.random.default_rng(4).standard_normal((2, 3, 4, 5)))
    bn = make_bn(3, np.float64)
    bn.backward(channels_last(np.ones_like(bn.forward(x))))
    assert calls == ["channel_mean_var", "normalise", "grad_sums", "affine_grad"]
    calls.clear()
    plain = np.random.default_rng(4).standard_normal((2, 3, 4, 5))    # NCHW memory: the NumPy passes
    bn.backward(np.ones_like(bn.forward(plain)))
    assert calls == []


def test_float32_statistics_of_the_loops_are_at_least_as_exact():
    # far from zero mean (mean/std = 100) float32 sums lose digits; the loops sum in float64
    rng = np.random.default_rng(5)
    x64 = rng.standard_normal((4, 8, 16, 16)) + 100.0
    d64 = rng.standard_normal(x64.shape)
    bn64 = make_bn(8, np.float64)
    want = layer_results(bn64, x64, d64, True)
    errors = {}
    for loops in (False, True):
        with compiled_loops(loops):
            got = layer_results(make_bn(8, np.float32), channels_last(x64.astype(np.float32)),
                                channels_last(d64.astype(np.float32)), True)
        errors[loops] = [np.abs(g - w).max() / np.abs(w).max() for g, w in zip(got, want)]
    # out, dx, dgamma, dbeta
    for with_loops, with_numpy in zip(errors[True], errors[False]):
        assert with_loops <= max(with_numpy, 1e-6), errors


@pytest.mark.parametrize("training", [True, False])
def test_gradients_through_the_loops_match_finite_differences(training):
    """Float64, the input channels-last and dout channels-last, so forward and backward both run the loops."""
    rng = np.random.default_rng(6)
    x = padded_view(rng.standard_normal((3, 4, 5, 3)), fill=0.0)
    g = channels_last(rng.standard_normal(x.shape))
    for layer in (make_bn(4, np.float64).train(training), ReLU()):
        if isinstance(layer, ReLU):   # |x| >= 0.1: the finite differences never cross the kink
            x = padded_view(rng.uniform(0.1, 1, x.shape) * rng.choice([-1, 1], x.shape), fill=0.0)
        layer.zero_grad()
        layer.forward(x)
        dx = layer.backward(g)

        def f():
            return float((layer.forward(x) * g).sum())
        assert relative_error(dx, numerical_gradient(f, x)) <= 1e-7
        for p in layer.parameters():
            analytic = p.grad.copy()
            assert relative_error(analytic, numerical_gradient(f, p.data)) <= 1e-7


def test_relu_with_the_loop_equals_its_numpy_passes():
    rng = np.random.default_rng(7)
    x, dout = rng.standard_normal((3, 5, 6, 7)), rng.standard_normal((3, 5, 6, 7))
    results = {}
    for loops in (True, False):
        with compiled_loops(loops):
            results[loops] = layer_results(ReLU(), padded_view(x), padded_view(dout), True)
    for with_loops, with_numpy in zip(results[True], results[False]):
        np.testing.assert_array_equal(with_loops, with_numpy)


def test_results_do_not_depend_on_the_number_of_threads():
    rng = np.random.default_rng(8)
    x = padded_view((rng.standard_normal((8, 16, 64, 64)) * 2 + 1).astype(np.float32))   # several blocks
    dout = channels_last(rng.standard_normal(x.shape).astype(np.float32))
    results = []
    try:
        for threads in (1, 2, 3):
            parallel.set_num_threads(threads)
            results.append(layer_results(make_bn(16, np.float32), x, dout, True))
    finally:
        parallel.set_num_threads(parallel._default_threads())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_environment_variable_switches_the_loops_off():
    code = ("from tinyunet.accel import compiled_loops as kernels; import numpy as np; "
            "x = np.zeros((1, 2, 3, 4)).transpose(0, 3, 1, 2); print(kernels.available(), kernels.usable(x))")
    env = dict(os.environ, TINYUNET_KERNELS="numpy", TINYUNET_BACKEND="numpy")
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.split() == ["False", "False"]
    env["TINYUNET_KERNELS"] = ""
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True"]
