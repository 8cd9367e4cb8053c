"""Module, Parameter and Sequential: names, gradient accumulation, modes, casting, state dicts."""
import numpy as np
import pytest

from tinyunet import backend
from tinyunet.nn import BatchNorm2d, Concat, Conv2d, ConvTranspose2d, MaxPool2d, Module, Parameter, ReLU, Sequential

pytestmark = pytest.mark.usefixtures("numpy_backend")


def small_net(seed=0):
    backend.seed(seed)
    return Sequential(Conv2d(2, 3, 3, padding=1), BatchNorm2d(3), ReLU(), MaxPool2d(2),
                      ConvTranspose2d(3, 2, 2, stride=2))


class Pair(Module):
    """A non-Sequential module with an attribute child, a list of children and its own parameter."""

    def __init__(self):
        self.scale = Parameter(np.ones(2))
        self.first = Conv2d(1, 2, 1)
        self.blocks = [Sequential(BatchNorm2d(2)), Conv2d(2, 2, 1, bias=False)]


def test_parameter_holds_data_and_zero_grad_of_same_shape_and_dtype():
    p = Parameter(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert p.shape == (2, 3) and p.grad.shape == (2, 3) and p.grad.dtype == np.float32
    assert not p.grad.any()
    assert "2, 3" in repr(p)


def test_named_parameters_are_dotted():
    names = [n for n, _ in small_net().named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    names = {n for n, _ in Pair().named_parameters()}
    assert names == {"scale", "first.weight", "first.bias", "blocks.0.0.weight", "blocks.0.0.bias", "blocks.1.weight"}
    assert {n for n, _ in Pair().named_buffers()} == {"blocks.0.0.running_mean", "blocks.0.0.running_var"}


def test_parameters_and_num_parameters():
    net = small_net()
    # conv 3*2*3*3 + 3, BN 3 + 3, convT 3*2*2*2 + 2
    assert net.num_parameters() == 54 + 3 + 6 + 24 + 2
    assert len(net.parameters()) == 6 and all(isinstance(p, Parameter) for p in net.parameters())


def test_sequential_forward_backward_is_the_composition():
    net = small_net().double()
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 6))
    h = x
    for layer in net.layers:
        h = layer.forward(h)
    np.testing.assert_allclose(net.forward(x), h, rtol=1e-12)
    g = np.random.default_rng(1).standard_normal(h.shape)
    net.zero_grad()
    dx = net.backward(g)
    other = small_net().double()  # same weights: layer by layer by hand
    other.forward(x)
    d = g
    for layer in reversed(other.layers):
        d = layer.backward(d)
    np.testing.assert_allclose(dx, d, rtol=1e-12)
    assert len(net) == 5 and net[3] is net.layers[3]


@pytest.mark.parametrize("make,shape", [
    (lambda: Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
    (lambda: ConvTranspose2d(2, 3, 2, stride=2), (2, 2, 3, 3)),
    (lambda: BatchNorm2d(2), (3, 2, 3, 3)),
    (lambda: small_net(), (2, 2, 4, 4)),
], ids=["conv", "convT", "bn", "sequential"])
def test_backward_accumulates_into_grad(make, shape):
    backend.seed(0)
    m = make().double()
    x = np.random.default_rng(2).standard_normal(shape)
    out = m.forward(x)
    g = np.random.default_rng(3).standard_normal(out.shape)
    dx1 = m.backward(g)
    first = {n: p.grad.copy() for n, p in m.named_parameters()}
    assert any(v.any() for v in first.values())
    m.forward(x)
    dx2 = m.backward(g)
    np.testing.assert_allclose(dx2, dx1, rtol=1e-12)  # d(input) is returned, not accumulated
    for n, p in m.named_parameters():
        np.testing.assert_allclose(p.grad, 2 * first[n], rtol=1e-12, atol=1e-15, err_msg=n)
    m.zero_grad()
    assert not any(p.grad.any() for p in m.parameters())


def test_concat_backward_returns_a_tuple():
    a, b = np.ones((1, 2, 2, 2)), np.zeros((1, 1, 2, 2))
    cat = Concat()
    out = cat.forward(a, b)
    grads = cat.backward(np.arange(out.size, dtype=float).reshape(out.shape))
    assert isinstance(grads, tuple) and [g.shape for g in grads] == [a.shape, b.shape]


def test_train_eval_propagate_to_nested_children():
    m = Pair()
    modules = list(m.modules())
    assert len(modules) == 5  # Pair, first, Sequential, BatchNorm2d, conv
    m.eval()
    assert not any(x.training for x in modules)
    m.train()
    assert all(x.training for x in modules)
    assert m.train(False) is m and not m.blocks[0][0].training


def test_to_double_and_float_cast_parameters_grads_and_buffers():
    m = Pair()
    assert m.first.weight.data.dtype == np.float32
    m.double()
    arrays = [p.data for p in m.parameters()] + [p.grad for p in m.parameters()] + [b for _, b in m.named_buffers()]
    assert all(a.dtype == np.float64 for a in arrays)
    m.float()
    arrays = [p.data for p in m.parameters()] + [p.grad for p in m.parameters()] + [b for _, b in m.named_buffers()]
    assert all(a.dtype == np.float32 for a in arrays)


def test_state_dict_round_trip_on_nested_module():
    a, b = Pair(), Pair()
    a.scale.data = np.array([2.0, 3.0])
    a.blocks[0][0].running_mean = np.array([0.5, -0.5], dtype=np.float32)
    state = a.state_dict()
    assert set(state) == {"scale", "first.weight", "first.bias", "blocks.0.0.weight", "blocks.0.0.bias",
                          "blocks.1.weight", "blocks.0.0.running_mean", "blocks.0.0.running_var"}
    assert all(type(v) is np.ndarray for v in state.values())
    b.load_state_dict(state)
    for name, value in b.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    np.testing.assert_array_equal(b.blocks[0][0].running_mean, [0.5, -0.5])
    assert b.scale.data.dtype == np.float64  # the model's dtype is kept, values come from the state


def test_load_state_dict_errors_name_the_problem():
    m = Pair()
    state = m.state_dict()
    bad = dict(state, scale=np.ones(3))
    with pytest.raises(ValueError, match="scale"):
        m.load_state_dict(bad)
    bad = {k: v for k, v in state.items() if k != "blocks.0.0.running_var"}
    with pytest.raises(ValueError, match="running_var"):
        m.load_state_dict(bad)
