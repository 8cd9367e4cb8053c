"""SGD and Adam against updates written out by hand (PyTorch's formulas), and state round trips."""
import math

import numpy as np
import pytest

from tinyunet.nn import Parameter
from tinyunet.optim import SGD, Adam

pytestmark = pytest.mark.usefixtures("numpy_backend", "accel_mode")

W0 = np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -3.0]])
GRADS = [  # fixed gradients of three steps (distinct signs and sizes)
    np.array([[0.1, -0.2, 0.3], [1.0, -0.5, 0.0]]),
    np.array([[-0.3, 0.1, 0.2], [0.5, 0.5, -1.0]]),
    np.array([[0.05, 0.4, -0.1], [-2.0, 0.0, 0.7]]),
]


def run(opt_factory, steps=3, w0=W0, grads=GRADS):
    p = Parameter(w0.copy())
    opt = opt_factory([p])
    history = []
    for g in grads[:steps]:
        opt.zero_grad()
        p.grad += g  # as a backward would: accumulate into a zeroed grad
        opt.step()
        history.append(p.data.copy())
    return p, opt, history


# ---------------------------------------------------------------- SGD, by hand
def sgd_by_hand(lr, momentum=0.0, weight_decay=0.0):
    w, buf, out = W0.copy(), None, []
    for g in GRADS:
        d = g + weight_decay * w
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + d  # PyTorch: buffer starts at d
            d = buf
        w = w - lr * d
        out.append(w.copy())
    return out


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.1), (0.8, 0.05)],
                         ids=["plain", "momentum", "weight_decay", "momentum+wd"])
def test_sgd_matches_hand_computation(momentum, weight_decay):
    _, _, history = run(lambda ps: SGD(ps, lr=0.1, momentum=momentum, weight_decay=weight_decay))
    for got, want in zip(history, sgd_by_hand(0.1, momentum, weight_decay)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_sgd_plain_numbers():
    # w1 = w0 - 0.1 g1, written out for one entry: 0.5 - 0.1*0.1 = 0.49
    _, _, history = run(lambda ps: SGD(ps, lr=0.1), steps=1)
    assert history[0][0, 0] == pytest.approx(0.49, abs=1e-15)


# ---------------------------------------------------------------- Adam, by hand
def adam_by_hand(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    w, m, v, out = W0.copy(), np.zeros_like(W0), np.zeros_like(W0), []
    for t, g in enumerate(GRADS, start=1):
        g = g + weight_decay * w  # L2: added to the gradient (Adam, not AdamW)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(w.copy())
    return out


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("eps", [1e-8, 0.1])  # a large eps pins where eps goes (after sqrt of v_hat)
def test_adam_matches_hand_computation(weight_decay, eps):
    _, _, history = run(lambda ps: Adam(ps, lr=0.01, betas=(0.9, 0.999), eps=eps, weight_decay=weight_decay))
    for got, want in zip(history, adam_by_hand(0.01, eps=eps, weight_decay=weight_decay)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_adam_first_step_is_lr_times_sign():
    # with bias correction, step 1 is lr * g / (|g| + eps) ~ lr * sign(g) for every non-zero g
    _, _, history = run(lambda ps: Adam(ps, lr=0.01), steps=1)
    g = GRADS[0]
    expected = W0 - 0.01 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(history[0], expected, rtol=1e-12)
    assert history[0][1, 2] == W0[1, 2]  # zero gradient: no move


def test_adam_defaults():
    opt = Adam([Parameter(W0.copy())])
    assert opt.lr == 1e-3 and tuple(opt.betas) == (0.9, 0.999) and opt.eps == 1e-8 and opt.weight_decay == 0.0


@pytest.mark.parametrize("factory", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
                                     lambda ps: Adam(ps, lr=0.01, weight_decay=0.01)], ids=["sgd", "adam"])
def test_float32_parameters_stay_float32(factory):
    p = Parameter(W0.astype(np.float32))
    opt = factory([p])
    for g in GRADS:
        opt.zero_grad()
        p.grad += g.astype(np.float32)
        opt.step()
    assert p.data.dtype == np.float32 and p.grad.dtype == np.float32
    assert all(a.dtype == np.float32 for arrays in opt.state.values() for a in arrays)


def test_zero_grad_clears_every_parameter():
    ps = [Parameter(W0.copy()), Parameter(np.ones(4))]
    for p in ps:
        p.grad += 1.0
    SGD(ps, lr=0.1).zero_grad()
    assert all(not p.grad.any() for p in ps)


def test_steps_update_several_parameters_independently():
    a, b = Parameter(W0.copy()), Parameter(-W0[0].copy())
    opt = Adam([a, b], lr=0.01)
    a.grad += GRADS[0]
    b.grad += GRADS[1][0]
    opt.step()
    np.testing.assert_allclose(a.data, W0 - 0.01 * GRADS[0] / (np.abs(GRADS[0]) + 1e-8), rtol=1e-12)
    np.testing.assert_allclose(b.data, -W0[0] - 0.01 * GRADS[1][0] / (np.abs(GRADS[1][0]) + 1e-8), rtol=1e-12)


# ---------------------------------------------------------------- state round trip
@pytest.mark.parametrize("factory", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
                                     lambda ps: SGD(ps, lr=0.1),
                                     lambda ps: Adam(ps, lr=0.01, weight_decay=0.01)],
                         ids=["sgd-momentum", "sgd-plain", "adam"])
def test_state_dict_round_trip_continues_identically(factory):
    reference_p, reference_opt, history = run(factory)  # three uninterrupted steps

    p, opt, _ = run(factory, steps=2)  # two steps, then save ...
    state = opt.state_dict()
    assert all(type(v) is np.ndarray for v in state.values())  # host arrays, flat keys
    assert int(state["step"]) == 2
    saved_w = p.data.copy()

    p2 = Parameter(saved_w.copy())  # ... and resume in a fresh optimizer
    opt2 = factory([p2])
    opt2.load_state_dict(state)
    assert opt2.t == 2
    p2.grad += GRADS[2]
    opt2.step()
    np.testing.assert_allclose(p2.data, history[2], rtol=1e-14, atol=1e-15)


def test_adam_state_dict_keys_and_values():
    _, opt, _ = run(lambda ps: Adam(ps, lr=0.01), steps=1)
    state = opt.state_dict()
    assert set(state) == {"step", "lr", "m.0", "v.0"}
    g = GRADS[0]
    np.testing.assert_allclose(state["m.0"], 0.1 * g, rtol=1e-12)
    np.testing.assert_allclose(state["v.0"], 0.001 * g * g, rtol=1e-12)
    assert float(state["lr"]) == 0.01


def test_state_dict_is_a_copy():
    _, opt, _ = run(lambda ps: Adam(ps, lr=0.01), steps=1)
    state = opt.state_dict()
    state["m.0"][...] = 123.0
    assert not (opt.state["m"][0] == 123.0).any()


def test_load_state_dict_rejects_wrong_shapes():
    _, opt, _ = run(lambda ps: Adam(ps, lr=0.01), steps=1)
    state = opt.state_dict()
    state["m.0"] = np.zeros((3, 2))
    other = Adam([Parameter(W0.copy())], lr=0.01)
    with pytest.raises(ValueError, match="m.0"):
        other.load_state_dict(state)


def test_lr_is_restored_from_state():
    _, opt, _ = run(lambda ps: SGD(ps, lr=0.05, momentum=0.5), steps=1)
    other = SGD([Parameter(W0.copy())], lr=1.0, momentum=0.5)
    other.load_state_dict(opt.state_dict())
    assert other.lr == 0.05 and math.isclose(float(opt.state_dict()["lr"]), 0.05)


def test_parameters_become_views_of_one_flat_buffer():
    """The optimizer moves every parameter's data and gradient into one flat buffer each (the values
    unchanged) and the layers' in-place updates land there."""
    rng = np.random.default_rng(8)
    arrays = [rng.standard_normal(shape) for shape in [(3, 2), (4,), (2, 1, 3)]]
    params = [Parameter(a.copy()) for a in arrays]
    for p in params:
        p.grad += 1.0
    opt = SGD(params, lr=0.5)
    assert opt.data.shape == opt.grad.shape == (6 + 4 + 6,)
    for p, a in zip(params, arrays):
        assert p.data.shape == a.shape and np.shares_memory(p.data, opt.data) and np.shares_memory(p.grad, opt.grad)
        np.testing.assert_array_equal(p.data, a)
    params[1].grad += 2.0                              # as a backward adds into its gradient
    opt.step()
    np.testing.assert_array_equal(params[1].data, arrays[1] - 0.5 * 3.0)
    np.testing.assert_array_equal(params[0].data, arrays[0] - 0.5 * 1.0)
    opt.zero_grad()
    assert not any(p.grad.any() for p in params)


def test_a_replaced_parameter_array_is_flattened_again():
    """model.to(...) or any code that gives a parameter a new array: the next step still updates it."""
    params = [Parameter(np.ones(3)), Parameter(np.ones(2))]
    opt = SGD(params, lr=1.0)
    params[0].data = np.full(3, 5.0)
    params[0].grad = np.full(3, 2.0)
    opt.step()
    np.testing.assert_array_equal(params[0].data, [3.0, 3.0, 3.0])
    assert np.shares_memory(params[0].data, opt.data)


def test_parameters_of_different_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype"):
        SGD([Parameter(np.ones(3)), Parameter(np.ones(2, np.float32))], lr=0.1)


def test_loading_a_model_state_keeps_the_optimizer_holding_its_parameters():
    from tinyunet.nn import Conv2d
    conv = Conv2d(2, 3, 3).double()
    opt = SGD(conv.parameters(), lr=1.0)
    state = {k: v + 1.0 for k, v in conv.state_dict().items()}
    conv.load_state_dict(state)                        # copied into the flat buffer's views
    conv.weight.grad[...] = 1.0
    opt.step()
    np.testing.assert_array_equal(conv.weight.data, state["weight"] - 1.0)


@pytest.mark.parametrize("factory", [lambda ps: SGD(ps, lr=0.1, momentum=0.9), lambda ps: Adam(ps, lr=1e-3)])
def test_the_accelerated_step_equals_the_reference_bit_for_bit(factory):
    """Parameters big enough for the step to run in chunks of the flat buffer on the threads: the same
    bits as the reference's one update over the whole buffer, on 1 and on 2 threads."""
    from tinyunet import backend
    from tinyunet.accel import optim as fast_optim
    from tinyunet.accel import parallel
    rng = np.random.default_rng(7)
    data = [rng.standard_normal(n).astype(np.float32) for n in (400_000, 400_000, 300_000, 300_000, 7)]
    grads = [[rng.standard_normal(d.shape).astype(np.float32) for d in data] for _ in range(3)]
    chunks = -(-sum(d.size for d in data) // fast_optim.CHUNK)
    assert len(parallel.row_blocks(chunks, fast_optim.CHUNK * fast_optim._UPDATE_PASSES * parallel.ELEMENTWISE_WORK)) > 1
    before, threads_before = backend.accelerate(), parallel.get_num_threads()
    results = []
    try:
        for accelerate, threads in ((False, 1), (True, 1), (True, 2)):
            backend.set_acceleration(accelerate)
            parallel.set_num_threads(threads)
            params = [Parameter(d.copy()) for d in data]
            opt = factory(params)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad[...] = g
                opt.step()
                assert (opt.fast is not None) == accelerate
            results.append([p.data.copy() for p in params])
    finally:
        backend.set_acceleration(before)
        parallel.set_num_threads(threads_before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
