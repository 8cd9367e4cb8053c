"""BatchNorm2d: train/eval forward against loop references, running statistics by hand, gradients."""
import numpy as np
import pytest

from tinyunet.nn import naive as ref
from tinyunet.gradcheck import check_module
from tinyunet.nn import BatchNorm2d

pytestmark = pytest.mark.usefixtures("numpy_backend", "accel_mode")

SHAPES = [(2, 3, 5, 7), (4, 2, 3, 1), (3, 5, 1, 3)]


def make(c, seed=0, dtype=np.float64, affine_random=True):
    bn = BatchNorm2d(c).to(dtype)
    if affine_random:  # non-trivial gamma/beta: a forgotten scale or shift must show
        rng = np.random.default_rng(seed)
        bn.weight.data = (rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c)).astype(dtype)
        bn.bias.data = rng.standard_normal(c).astype(dtype)
    return bn


def test_defaults_match_pytorch():
    bn = BatchNorm2d(3)
    assert bn.eps == 1e-5 and bn.momentum == 0.1 and bn.training
    np.testing.assert_array_equal(bn.weight.data, np.ones(3))
    np.testing.assert_array_equal(bn.bias.data, np.zeros(3))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3))
    np.testing.assert_array_equal(bn.running_var, np.ones(3))
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


@pytest.mark.parametrize("shape", SHAPES)
def test_train_forward_matches_reference(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 3 + 2
    bn = make(shape[1])
    expected, _, _ = ref.batchnorm2d_train(x, bn.weight.data, bn.bias.data)
    np.testing.assert_allclose(bn.forward(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_forward_uses_running_stats(shape):
    rng = np.random.default_rng(2)
    c = shape[1]
    bn = make(c).eval()
    bn.running_mean = rng.standard_normal(c)
    bn.running_var = rng.uniform(0.5, 2.0, c)
    x = rng.standard_normal(shape)
    expected = ref.batchnorm2d_eval(x, bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var)
    np.testing.assert_allclose(bn.forward(x), expected, rtol=1e-10, atol=1e-10)
    # and eval does not touch the running statistics
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    bn.forward(x)
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)


def test_running_stats_after_several_batches_by_hand():
    rng = np.random.default_rng(3)
    bn = make(3)
    mean, var = np.zeros(3), np.ones(3)  # PyTorch's initial running statistics
    for step in range(4):
        x = rng.standard_normal((2 + step, 3, 3, 5)) * (step + 1) + step
        bn.forward(x)
        values = x.transpose(1, 0, 2, 3).reshape(3, -1)  # per channel: all N*H*W values
        m = values.shape[1]
        batch_mean = values.sum(axis=1) / m
        unbiased = ((values - batch_mean[:, None]) ** 2).sum(axis=1) / (m - 1)
        mean = 0.9 * mean + 0.1 * batch_mean
        var = 0.9 * var + 0.1 * unbiased
        np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(bn.running_var, var, rtol=1e-12)
    # and eval now normalises with exactly those numbers
    bn.eval()
    x = rng.standard_normal((2, 3, 4, 4))
    expected = ref.batchnorm2d_eval(x, bn.weight.data, bn.bias.data, mean, var)
    np.testing.assert_allclose(bn.forward(x), expected, rtol=1e-10, atol=1e-10)


def test_running_stats_match_reference_statistics():
    x = np.random.default_rng(4).standard_normal((3, 2, 4, 3))
    bn = make(2)
    bn.forward(x)
    _, batch_mean, unbiased = ref.batchnorm2d_train(x, bn.weight.data, bn.bias.data)
    np.testing.assert_allclose(bn.running_mean, 0.1 * batch_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * unbiased, rtol=1e-12)


def test_eval_single_image_equals_within_batch():
    rng = np.random.default_rng(5)
    bn = make(3)
    for _ in range(3):
        bn.forward(rng.standard_normal((4, 3, 5, 5)) + 1.5)
    bn.eval()
    batch = rng.standard_normal((4, 3, 5, 5))
    together = bn.forward(batch)
    for i in range(4):
        np.testing.assert_allclose(bn.forward(batch[i:i + 1]), together[i:i + 1], rtol=1e-13, atol=1e-14)
    # in train mode the same image is normalised by its own batch: the answers differ
    bn.train()
    assert not np.allclose(bn.forward(batch[:1]), together[:1])


@pytest.mark.parametrize("shape", SHAPES)
def test_train_gradients_match_finite_differences(shape):
    # smooth everywhere (var + eps > 0): any random input is fine; running-stat updates during the
    # repeated forwards do not change the train-mode output
    x = np.random.default_rng(6).standard_normal(shape)
    errors = check_module(make(shape[1], seed=7), x)
    assert set(errors) == {"input0", "weight", "bias"}
    assert max(errors.values()) <= 1e-6, errors


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_eval_gradients_match_finite_differences(shape):
    rng = np.random.default_rng(8)
    bn = make(shape[1], seed=9).eval()
    bn.running_mean = rng.standard_normal(shape[1])
    bn.running_var = rng.uniform(0.5, 2.0, shape[1])
    errors = check_module(bn, rng.standard_normal(shape))
    assert max(errors.values()) <= 1e-6, errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_dtype_is_preserved(dtype, training):
    x = (np.random.default_rng(10).standard_normal((2, 3, 5, 7)) * 2 + 1).astype(dtype)
    bn = make(3, dtype=dtype).train(training)
    out = bn.forward(x)
    assert out.dtype == dtype
    dx = bn.backward(np.ones(x.shape, dtype=dtype))
    assert dx.dtype == dtype
    assert bn.weight.grad.dtype == dtype and bn.bias.grad.dtype == dtype
    assert bn.running_mean.dtype == dtype and bn.running_var.dtype == dtype
    x64 = x.astype(np.float64)
    gamma, beta = bn.weight.data.astype(np.float64), bn.bias.data.astype(np.float64)
    if training:
        expected = ref.batchnorm2d_train(x64, gamma, beta)[0]
    else:
        expected = ref.batchnorm2d_eval(x64, gamma, beta, np.zeros(3), np.ones(3))
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)


def memory_layouts(x):
    """The same (N, C, H, W) numbers in the three memory layouts a BatchNorm meets: NCHW, channels-last,
    and a conv's output (an NCHW-shaped view of channels-last rows that skips a padding border)."""
    n, c, h, w = x.shape
    padded = np.full((n, h + 2, w + 2, c), np.nan)  # garbage outside the view must never be read
    padded[:, :h, :w] = x.transpose(0, 2, 3, 1)
    return {"nchw": x, "channels_last": np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
            "padded_view": padded[:, :h, :w].transpose(0, 3, 1, 2)}


@pytest.mark.parametrize("training", [True, False])
def test_every_memory_layout_gives_the_reference_result(training):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 4, 5, 6)) * 2 + 1
    dout = rng.standard_normal(x.shape)
    expected, _, _ = ref.batchnorm2d_train(x, make(4).weight.data, make(4).bias.data)
    results = {}
    for name, xl in memory_layouts(x).items():
        bn = make(4)
        bn.running_mean, bn.running_var = np.linspace(-1, 1, 4), np.linspace(0.5, 2, 4)
        bn.train(training)
        out = bn.forward(xl)
        results[name] = (out, bn.backward(memory_layouts(dout)[name]), bn.weight.grad, bn.bias.grad)
        if training:
            np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)
    for name in ("channels_last", "padded_view"):
        for got, want in zip(results[name], results["nchw"]):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
