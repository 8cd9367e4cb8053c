"""tinyunet.gradcheck: relative_error, numerical_gradient, that checks CAN fail, and the full suite."""
import numpy as np
import pytest

from tinyunet import backend
from tinyunet import gradcheck
from tinyunet.gradcheck import (check_loss, check_model_with_loss, check_module, numerical_gradient, relative_error,
                                run_all)
from tinyunet.losses import CrossEntropyLoss
from tinyunet.nn import BatchNorm2d, Conv2d, MaxPool2d, ReLU, Sequential

pytestmark = pytest.mark.usefixtures("numpy_backend")


# ------------------------------------------------------------------ relative_error
def test_relative_error_basics():
    a = np.array([1.0, -2.0, 4.0])
    assert relative_error(a, a) == 0.0
    assert relative_error(a, a.copy()) == 0.0
    # max |a - n| / max(max|a|, max|n|): off by a factor 2 -> 4 / 8
    assert relative_error(a, 2 * a) == pytest.approx(0.5)
    assert relative_error(2 * a, a) == pytest.approx(0.5)
    # sign flipped: |a - (-a)| = 2|a| -> 8 / 4
    assert relative_error(a, -a) == pytest.approx(2.0)
    # the scale is the largest entry of either tensor, not entry by entry
    assert relative_error(np.array([100.0, 1e-9]), np.array([100.0, 2e-9])) == pytest.approx(1e-11)
    assert relative_error(np.array([1.0, 0.0]), np.array([1.0, 1e-3])) == pytest.approx(1e-3)


def test_relative_error_edge_cases():
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0  # no 0/0
    assert relative_error(np.zeros(0), np.zeros(0)) == 0.0
    assert relative_error(np.zeros(3), np.ones(3)) == pytest.approx(1.0)
    assert isinstance(relative_error(np.ones(2, np.float32), np.ones(2)), float)


# ------------------------------------------------------------------ numerical_gradient
def test_numerical_gradient_of_known_function():
    x = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.3]])
    before = x.copy()
    grad = numerical_gradient(lambda: float((x ** 3).sum() + np.sin(x).sum()), x)
    np.testing.assert_allclose(grad, 3 * before ** 2 + np.cos(before), rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(x, before)  # restored exactly
    assert grad.shape == x.shape and grad.dtype == x.dtype


def test_numerical_gradient_step_size():
    # central differences are exact for quadratics (error O(h^2) * f''' = 0) for any h
    x = np.array([1.0, 2.0])
    grad = numerical_gradient(lambda: float((x ** 2).sum()), x, h=1e-3)
    np.testing.assert_allclose(grad, [2.0, 4.0], rtol=1e-9)


def test_numerical_gradient_of_selected_entries_only():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    grad = numerical_gradient(lambda: float((x ** 2).sum()), x, indices=[1, 3])
    np.testing.assert_allclose(grad, [0.0, 4.0, 0.0, 8.0], rtol=1e-8, atol=1e-12)


def test_numerical_gradient_of_non_contiguous_array():
    # e.g. a transposed view, or an NCHW view of channels-last memory as the layers return
    x = np.arange(1.0, 7.0).reshape(2, 3).T
    assert not x.flags.c_contiguous
    grad = numerical_gradient(lambda: float((x ** 2).sum()), x)
    np.testing.assert_allclose(grad, 2 * x, rtol=1e-8)


# ------------------------------------------------------------------ a correct check passes ...
def test_check_module_reports_every_tensor():
    backend.seed(0)
    conv = Conv2d(2, 3, 3, padding=1).double()
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 4))
    errors = check_module(conv, x)
    assert set(errors) == {"input0", "weight", "bias"}
    assert max(errors.values()) <= 1e-6


# ------------------------------------------------------------------ ... and broken layers fail
class ScaledInputGradConv(Conv2d):
    """d(input) off by a factor 2."""

    def backward(self, dout):
        return 2 * super().backward(dout)


class FlippedKernelGradConv(Conv2d):
    """The weight gradient of a *convolution* (kernel flipped) instead of a cross-correlation."""

    def backward(self, dout):
        before = self.weight.grad.copy()
        dx = super().backward(dout)
        self.weight.grad[...] = before + (self.weight.grad - before)[:, :, ::-1, ::-1]
        return dx


class TransposedInputGradConv(Conv2d):
    """d(input) with H and W swapped (square input, so the shape still fits)."""

    def backward(self, dout):
        return super().backward(dout).transpose(0, 1, 3, 2)


class LeakyReLUGrad(ReLU):
    """Forward is ReLU, backward pretends negative inputs pass 10% of the gradient."""

    def forward(self, x):
        self.x = x
        return super().forward(x)

    def backward(self, dout):
        super().backward(dout)
        return np.where(self.x > 0, dout, 0.1 * dout)


class EvalBackwardBatchNorm(BatchNorm2d):
    """Train-mode forward, but d(input) as if mean and var were constants (the eval-mode formula)."""

    def forward(self, x):
        self.x = x
        return super().forward(x)

    def backward(self, dout):
        super().backward(dout)  # keeps the correct weight and bias gradients
        var = self.x.var(axis=(0, 2, 3)).reshape(1, -1, 1, 1)
        return dout * self.weight.data.reshape(1, -1, 1, 1) / np.sqrt(var + self.eps)


class MirroredMaxPool(MaxPool2d):
    """Sends each gradient to the mirror image (in H and W) of its window's maximum."""

    def backward(self, dout):
        return super().backward(dout)[:, :, ::-1, ::-1]


@pytest.mark.parametrize("make,bad_tensor", [
    (lambda: ScaledInputGradConv(2, 3, 3, padding=1), "input0"),
    (lambda: FlippedKernelGradConv(2, 3, 3, padding=1), "weight"),
    (lambda: TransposedInputGradConv(2, 3, 3, padding=1), "input0"),
], ids=["input-grad-x2", "flipped-kernel", "transposed-input-grad"])
def test_broken_conv_is_reported(make, bad_tensor):
    backend.seed(0)
    layer = make().double()
    x = np.random.default_rng(1).standard_normal((2, 2, 5, 5))
    errors = check_module(layer, x)
    assert errors[bad_tensor] > 0.1, errors
    others = {k: v for k, v in errors.items() if k != bad_tensor}
    assert max(others.values()) <= 1e-6, others  # the check points at the broken tensor only


def test_broken_relu_is_reported():
    rng = np.random.default_rng(2)
    x = rng.uniform(0.1, 1.0, (2, 3, 4, 4)) * rng.choice([-1.0, 1.0], (2, 3, 4, 4))
    assert check_module(LeakyReLUGrad(), x)["input0"] > 0.05


def test_broken_batchnorm_is_reported():
    x = np.random.default_rng(3).standard_normal((4, 2, 3, 3))
    bn = EvalBackwardBatchNorm(2).double()
    errors = check_module(bn, x)
    assert errors["input0"] > 0.1, errors
    assert errors["weight"] <= 1e-6 and errors["bias"] <= 1e-6


def test_broken_maxpool_is_reported():
    x = np.random.default_rng(4).permutation(2 * 2 * 6 * 6).reshape(2, 2, 6, 6) * 0.01  # no ties
    assert check_module(MaxPool2d(2), x)["input0"] <= 1e-6
    assert check_module(MirroredMaxPool(2), x)["input0"] > 0.1


class UnnormalisedLoss(CrossEntropyLoss):
    """Forgets to divide the gradient by the number of pixels."""

    def backward(self):
        norm = self.cache[-1]
        return super().backward() * norm


def test_broken_loss_is_reported():
    rng = np.random.default_rng(5)
    logits, target = rng.standard_normal((2, 3, 4, 5)), rng.integers(0, 3, (2, 4, 5))
    assert check_loss(CrossEntropyLoss(), logits, target) <= 1e-6
    assert check_loss(UnnormalisedLoss(), logits, target) > 0.5


def _kinked_model(relu):
    """1x1 conv (weight 1, bias 0) -> ReLU -> 1x1 conv; pixel (0, 0) sits 5e-7 above the ReLU's kink,
    so a finite difference of the first bias with h = 1e-6 steps across it, one with h = 1e-7 does not."""
    first, second = Conv2d(1, 1, 1).double(), Conv2d(1, 2, 1).double()
    first.weight.data[...] = 1.0
    first.bias.data[...] = 0.0
    second.weight.data[...] = np.array([1.0, -2.0]).reshape(2, 1, 1, 1)
    x = np.full((1, 1, 2, 2), 0.5)
    x[0, 0, 0, 0] = 5e-7
    return Sequential(first, relu, second), x, np.array([[[0, 1], [1, 0]]])


def test_model_check_steps_back_from_a_kink(monkeypatch):
    model, x, target = _kinked_model(ReLU())
    monkeypatch.setattr(gradcheck, "KINK_RETRY_ERROR", np.inf)  # no second step: the kink shows
    assert check_model_with_loss(model, CrossEntropyLoss(), x, target)["0.bias"] > 1e-3
    monkeypatch.undo()
    errors = check_model_with_loss(model, CrossEntropyLoss(), x, target)
    assert max(errors.values()) <= 1e-6, errors


def test_model_check_still_reports_a_wrong_backward():
    """The second steps do not rescue a wrong backward (ReLU passing 10% below zero)."""
    model, x, target = _kinked_model(LeakyReLUGrad())
    x[0, 0, 1, 1] = -0.5  # a pixel below the kink, where the broken backward is wrong
    errors = check_model_with_loss(model, CrossEntropyLoss(), x, target)
    assert errors["input"] > 1e-2 and errors["0.weight"] > 1e-2, errors


def test_model_check_takes_a_larger_step_for_a_tiny_gradient(monkeypatch):
    """A gradient of 1e-6 against a loss near 1: h = 1e-6 measures it with ~1e-10 of rounding noise
    (1e-4 of it); 10h measures it ten times better. The retry reports the better step."""
    model, x, target = _kinked_model(ReLU())
    x[0, 0, 0, 0] = 0.5                                   # no kink near
    model.layers[2].weight.data[...] = np.array([1e-6, -2e-6]).reshape(2, 1, 1, 1)   # a tiny gradient upstream
    monkeypatch.setattr(gradcheck, "KINK_RETRY_ERROR", np.inf)
    single = check_model_with_loss(model, CrossEntropyLoss(), x, target)["0.weight"]
    monkeypatch.undo()
    retried = check_model_with_loss(model, CrossEntropyLoss(), x, target)["0.weight"]
    assert retried < single / 10, (single, retried)


# ------------------------------------------------------------------ the whole suite (~30 s)
@pytest.mark.parametrize("accelerate", [False, True], ids=["reference", "accelerated"])
def test_run_all_passes_and_covers_everything(accelerate, monkeypatch):
    from tinyunet import backend
    monkeypatch.setattr(backend, "_acceleration", accelerate)
    rows = run_all()
    failed = [r for r in rows if not r[3]]
    assert not failed, failed
    layers = ("Conv2d", "MaxPool2d", "ConvTranspose2d", "Concat", "ReLU", "BatchNorm2d", "CrossEntropyLoss")
    labels = {r[0].split("(")[0] for r in rows}
    assert set(layers) | {"UNet"} <= labels, labels
    for label, tensor, err, _ in rows:
        if label.split("(")[0] in layers:
            assert err <= 1e-6, (label, tensor, err)
        elif label.startswith("UNet"):
            assert err <= 1e-5, (label, tensor, err)
    unet_tensors = {r[1] for r in rows if r[0].startswith("UNet")}
    assert {"input", "head.weight", "head.bias", "down.0.0.weight", "up.0.weight"} <= unet_tensors
