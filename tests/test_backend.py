"""tinyunet.backend, and the whole package under a strict CuPy stand-in (tinyunet/fake_cupy.py).

The stand-in refuses every implicit device -> host conversion, as CuPy does, and counts explicit
transfers, so these tests find ``np.`` calls on device arrays and stray host syncs without a GPU.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from tinyunet import fake_cupy as fake_module
from tinyunet import backend
from tinyunet.backend import BackendError


def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "TINYUNET_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=60)


# ================================================================== selecting a backend
def test_env_numpy_selects_numpy():
    result = run_python("from tinyunet import backend; import numpy; "
                        "print(backend.name(), backend.xp.zeros(2).__class__ is numpy.ndarray)",
                        TINYUNET_BACKEND="numpy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numpy", "True"]


def test_env_value_is_case_and_space_insensitive():
    result = run_python("from tinyunet import backend; print(backend.name())", TINYUNET_BACKEND=" NumPy ")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "numpy"


# CuPy is made unimportable inside the child (sys.modules entry None -> ImportError), so the test means
# "CuPy is not installed" on every machine, with or without a GPU.
NO_CUPY = "import sys; sys.modules['cupy'] = None\n"


def test_env_cupy_without_cupy_raises_backend_error_saying_why():
    code = NO_CUPY + (
        "from tinyunet import backend\n"
        "try:\n"
        "    backend.xp.zeros(1)\n"
        "except backend.BackendError as e:\n"
        "    print('BackendError:', e)\n"
        "else:\n"
        "    print('no error, backend', backend.name())\n")
    result = run_python(code, TINYUNET_BACKEND="cupy")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("BackendError:"), out
    assert "cupy" in out.lower() and "does not import" in out and "--backend numpy" in out


def test_use_cupy_without_cupy_raises_and_keeps_current_backend(monkeypatch, numpy_backend):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(BackendError, match="does not import"):
        backend.use("cupy")
    assert backend.name() == "numpy" and backend.xp.zeros(1).__class__ is np.ndarray


def test_default_without_cupy_falls_back_to_numpy():
    result = run_python(NO_CUPY + "from tinyunet import backend; print(backend.name())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "numpy"


def test_unknown_backend_is_an_error(numpy_backend):
    with pytest.raises(BackendError, match="unknown backend 'jax'"):
        backend.use("jax")
    assert backend.name() == "numpy"
    result = run_python("from tinyunet import backend\ntry:\n    backend.name()\n"
                        "except backend.BackendError as e:\n    print('BackendError:', e)",
                        TINYUNET_BACKEND="tensorflow")
    assert result.stdout.startswith("BackendError:") and "tensorflow" in result.stdout, result.stdout + result.stderr


def test_to_device_to_host_round_trip_numpy(numpy_backend):
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    d = backend.to_device(a)
    np.testing.assert_array_equal(backend.to_host(d), a)
    d32 = backend.to_device(a, np.float32)
    assert d32.dtype == np.float32
    np.testing.assert_array_equal(backend.to_host(d32), a.astype(np.float32))
    assert type(backend.to_host(d32)) is np.ndarray


def test_seed_makes_initialisation_reproducible(numpy_backend):
    from tinyunet.models import UNet

    backend.seed(3)
    a = UNet(base_channels=2, depth=2).state_dict()
    backend.seed(3)
    b = UNet(base_channels=2, depth=2).state_dict()
    backend.seed(4)
    c = UNet(base_channels=2, depth=2).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["down.0.0.weight"], c["down.0.0.weight"])


# ================================================================== the stand-in itself
def test_switching_modules_leaves_no_names_of_the_previous_one(fake_cupy):
    """xp carries the active module's names as its own attributes (fast lookups): after a switch
    none of the previous module's may remain, or layer code would quietly run on the wrong one."""
    from tinyunet import fake_cupy as fake
    from tinyunet.backend import xp
    assert isinstance(xp.zeros(3), fake.FakeCupyArray)          # forwarded by the stand-in's __getattr__
    assert xp.ndarray is fake.FakeCupyArray and xp.asnumpy is fake.asnumpy
    assert xp.ascontiguousarray is not np.ascontiguousarray and xp.float32 is np.float32
    backend.use("numpy")
    assert xp.empty is np.empty and xp.ndarray is np.ndarray
    assert not hasattr(xp, "asnumpy")                           # a stand-in name, gone with it


def test_stand_in_refuses_implicit_conversion(fake_cupy):
    d = backend.to_device(np.arange(6.0).reshape(2, 3))
    assert isinstance(d, fake_cupy.FakeCupyArray) and not isinstance(d, np.ndarray)
    with pytest.raises(TypeError):
        np.asarray(d)
    with pytest.raises(TypeError):
        np.array(d)
    with pytest.raises(TypeError):
        np.array([d, d])
    with pytest.raises(TypeError):
        np.sum(d)
    with pytest.raises(TypeError):
        np.concatenate([d, d])
    with pytest.raises(TypeError):
        np.where(d > 0, d, 0)
    with pytest.raises(TypeError):  # host array mixed into device arithmetic, both ways
        d + np.ones(3)
    with pytest.raises(TypeError):
        np.ones(3) * d
    with pytest.raises(TypeError):
        backend.xp.matmul(d, np.ones((3, 2)))
    assert fake_cupy.stats["transfers"] == 0


def test_stand_in_catches_a_real_mistake(fake_cupy):
    # the kind of bug the stand-in exists for: code that works on NumPy and breaks on CuPy
    def buggy_mean(x):
        return np.asarray(x).mean()

    def buggy_sum(x):
        return np.sum(x * 2)

    def correct_sum(x):
        return backend.xp.sum(x * 2)

    d = backend.to_device(np.ones((2, 3)))
    with pytest.raises(TypeError):
        buggy_mean(d)
    with pytest.raises(TypeError):
        buggy_sum(d)
    assert isinstance(correct_sum(d), fake_cupy.FakeCupyArray)
    assert float(correct_sum(d)) == 12.0
    # ... and on NumPy the buggy code runs fine, which is why a NumPy-only test suite misses it
    backend.use("numpy")
    assert buggy_sum(backend.to_device(np.ones((2, 3)))) == 12.0


def test_stand_in_counts_explicit_transfers(fake_cupy):
    d = backend.to_device(np.array([[1.5, -2.0], [3.0, 4.0]]))
    fake_cupy.reset_counters()
    host = d.get()
    assert type(host) is np.ndarray and fake_cupy.stats["transfers"] == 1
    assert float(d[0, 0]) == 1.5 and int(d[1, 1]) == 4 and bool(d[1, 0] > 0)
    assert d[0, 1].item() == -2.0
    assert fake_cupy.stats["transfers"] == 5
    assert [kind for kind, _ in fake_cupy.transfer_log] == ["get", "float", "int", "bool", "item"]
    host[0, 0] = 99.0  # .get() is a copy
    assert float(d[0, 0]) == 1.5


def test_stand_in_arrays_behave_like_device_arrays(fake_cupy):
    xp, F = backend.xp, fake_cupy.FakeCupyArray
    a = backend.to_device(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    b = xp.ones((2, 3, 4), dtype=xp.float32)
    results = [a + b, a * 2, 2 - a, a / b, -a, a ** 2, a @ b.transpose(0, 2, 1), a > 3, a.T, a.reshape(6, 4),
               a.sum(), a.sum(axis=1), a.mean(axis=(0, 2)), a.max(axis=2, keepdims=True), a.argmax(axis=1),
               a.astype(xp.float64), a.copy(), a[0], a[:, 1:], a[a > 3], xp.exp(a), np.exp(a), xp.maximum(a, 0),
               xp.where(a > 3, a, 0), xp.concatenate([a, b], axis=1), xp.stack([a, b]), xp.zeros_like(a)]
    assert all(isinstance(r, F) for r in results), [type(r) for r in results]
    assert a.shape == (2, 3, 4) and a.dtype == np.float32 and a.size == 24 and a.ndim == 3 and len(a) == 2
    assert (a + b).dtype == np.float32 and (a * 2).dtype == np.float32
    c = a.copy()
    c += b
    c[:, 0] = 0
    c[0] *= 2
    view = c.reshape(-1)
    view[0] = -5.0  # a reshape of a contiguous array is a view, as on CuPy
    host = c.get()
    expected = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1
    expected[:, 0] = 0
    expected[0] *= 2
    expected.reshape(-1)[0] = -5.0
    np.testing.assert_array_equal(host, expected)
    out = xp.empty_like(a)
    xp.subtract(a, b, out=out)
    np.testing.assert_array_equal(out.get(), np.arange(24).reshape(2, 3, 4) - 1)


def test_to_device_to_host_round_trip_stand_in(fake_cupy):
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    d = backend.to_device(a, np.float32)
    assert isinstance(d, fake_cupy.FakeCupyArray) and d.dtype == np.float32
    d2 = backend.to_device(a)
    a[0, 0] = 100.0  # to_device copies: the device array does not follow the host array
    fake_cupy.reset_counters()
    back = backend.to_host(d2)
    assert type(back) is np.ndarray and fake_cupy.stats["transfers"] == 1
    np.testing.assert_array_equal(back, np.arange(12, dtype=np.float64).reshape(3, 4))


# ================================================================== the package under the stand-in
LAYERS = {
    "Conv2d": (lambda nn: nn.Conv2d(3, 4, 3, stride=2, padding=1), [(2, 3, 7, 9)]),
    "Conv2d-1x1": (lambda nn: nn.Conv2d(3, 4, 1), [(2, 3, 5, 5)]),
    "Conv2d-nobias": (lambda nn: nn.Conv2d(3, 2, 5, padding=2, bias=False), [(2, 3, 6, 5)]),
    "Conv2d-shifted": (lambda nn: nn.Conv2d(5, 3, 3, padding=1), [(2, 5, 17, 18)]),
    "Conv2d-winograd": (lambda nn: nn.Conv2d(64, 64, 3, padding=1), [(2, 64, 32, 32)]),  # 512 tiles
    "MaxPool2d": (lambda nn: nn.MaxPool2d(2), [(2, 3, 7, 9)]),
    "MaxPool2d(3,1)": (lambda nn: nn.MaxPool2d(3, 1), [(2, 3, 6, 5)]),
    "ConvTranspose2d": (lambda nn: nn.ConvTranspose2d(4, 3, 2, stride=2), [(2, 4, 3, 5)]),
    "ConvTranspose2d-p1": (lambda nn: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), [(2, 2, 4, 3)]),
    "Concat": (lambda nn: nn.Concat(1), [(2, 2, 3, 3), (2, 3, 3, 3)]),
    "ReLU": (lambda nn: nn.ReLU(), [(2, 3, 4, 5)]),
    "BatchNorm2d-train": (lambda nn: nn.BatchNorm2d(3), [(4, 3, 3, 2)]),
    "BatchNorm2d-eval": (lambda nn: nn.BatchNorm2d(3).eval(), [(2, 3, 3, 2)]),
}


def _run_layer(name, to_dev):
    """Forward + backward of one layer on the active backend; host copies of everything."""
    import tinyunet.nn as nn

    make, shapes = LAYERS[name]
    backend.seed(0)
    layer = make(nn)
    rng = np.random.default_rng(0)
    inputs = [to_dev(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    out = layer.forward(*inputs)
    dout = to_dev(rng.standard_normal(tuple(out.shape)).astype(np.float32))
    dx = layer.backward(dout)
    dx = dx if isinstance(dx, tuple) else (dx,)
    return out, dx, [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("name", list(LAYERS))
def test_each_layer_runs_on_the_stand_in_without_host_transfers(name, fake_cupy):
    fake_cupy.reset_counters()
    out, dx, grads = _run_layer(name, backend.to_device)
    assert fake_cupy.stats["transfers"] == 0, fake_cupy.transfer_log
    for a in [out, *dx, *grads]:
        assert isinstance(a, fake_cupy.FakeCupyArray) and a.dtype == np.float32
    device = [a.get() for a in [out, *dx, *grads]]
    backend.use("numpy")  # the same reference layer on NumPy: the same numbers
    accelerate = backend.set_acceleration(False)
    try:
        out, dx, grads = _run_layer(name, lambda a: a)
    finally:
        backend.set_acceleration(accelerate)
    for got, want in zip(device, [out, *dx, *grads]):
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_loss_on_the_stand_in(fake_cupy):
    from tinyunet.losses import CrossEntropyLoss

    rng = np.random.default_rng(0)
    logits = backend.to_device(rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    target = backend.to_device(rng.integers(0, 4, (2, 4, 5)))
    loss = CrossEntropyLoss(weight=np.array([1.0, 2.0, 0.5]), ignore_index=3)  # host weights moved by the loss
    fake_cupy.reset_counters()
    value = loss.forward(logits, target)
    grad = loss.backward()
    assert fake_cupy.stats["transfers"] == 0, fake_cupy.transfer_log
    assert isinstance(value, fake_cupy.FakeCupyArray) and value.shape == () and value.dtype == np.float32
    assert isinstance(grad, fake_cupy.FakeCupyArray) and grad.dtype == np.float32


def _training_step(seed=0):
    """Build on the active backend, move a batch once, one step; returns (loss as float, model)."""
    from tinyunet.losses import CrossEntropyLoss
    from tinyunet.models import UNet
    from tinyunet.optim import Adam

    backend.seed(seed)
    model = UNet(in_channels=3, num_classes=3, base_channels=4, depth=2)
    opt = Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    loss_fn = CrossEntropyLoss(weight=np.array([1.0, 2.0, 1.5], dtype=np.float32), ignore_index=255)
    rng = np.random.default_rng(seed)
    x_host = rng.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    y_host = rng.integers(0, 3, (2, 16, 16)).astype(np.uint8)
    y_host[0, :2] = 255
    return model, opt, loss_fn, x_host, y_host


def test_full_training_step_on_the_stand_in_has_one_host_transfer(fake_cupy):
    model, opt, loss_fn, x_host, y_host = _training_step()
    assert all(isinstance(p.data, fake_cupy.FakeCupyArray) for p in model.parameters())
    fake_cupy.reset_counters()
    x = backend.to_device(x_host, np.float32) / 255.0
    y = backend.to_device(y_host)
    opt.zero_grad()
    logits = model.forward(x)
    loss = loss_fn.forward(logits, y)
    model.backward(loss_fn.backward())
    opt.step()
    assert fake_cupy.stats["transfers"] == 0, fake_cupy.transfer_log  # nothing came back to the host ...
    value = float(loss)
    assert fake_cupy.stats["transfers"] == 1  # ... until the loss is read, once
    assert all(isinstance(p.data, fake_cupy.FakeCupyArray) and p.data.dtype == np.float32 for p in model.parameters())
    device_weights = {k: v for k, v in model.state_dict().items()}
    assert all(type(v) is np.ndarray for v in device_weights.values())  # state_dict copies to the host

    # the same step on NumPy gives the same numbers: the stand-in changes nothing but strictness (the
    # reference layers on both: the acceleration's sums run in another order, and Adam's first step,
    # ~lr * sign(grad), would turn rounding in a near-zero gradient into a visible difference)
    backend.use("numpy")
    accelerate = backend.set_acceleration(False)
    try:
        model, opt, loss_fn, x_host, y_host = _training_step()
        x = x_host.astype(np.float32) / 255.0
        opt.zero_grad()
        loss = loss_fn.forward(model.forward(x), y_host)
        model.backward(loss_fn.backward())
        opt.step()
    finally:
        backend.set_acceleration(accelerate)
    assert value == float(loss)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(device_weights[k], v, err_msg=k)


def test_model_and_optimizer_state_round_trip_on_the_stand_in(fake_cupy):
    from tinyunet.models import UNet
    from tinyunet.optim import Adam

    model, opt, loss_fn, x_host, y_host = _training_step()
    x, y = backend.to_device(x_host, np.float32), backend.to_device(y_host)
    loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward())
    opt.step()
    state, opt_state = model.state_dict(), opt.state_dict()
    assert all(type(v) is np.ndarray for v in list(state.values()) + list(opt_state.values()))
    other = UNet(in_channels=3, num_classes=3, base_channels=4, depth=2)
    other.load_state_dict(state)
    other_opt = Adam(other.parameters(), lr=1.0)
    other_opt.load_state_dict(opt_state)
    assert all(isinstance(p.data, fake_cupy.FakeCupyArray) for p in other.parameters())
    assert all(isinstance(b, fake_cupy.FakeCupyArray) for _, b in other.named_buffers())
    assert all(isinstance(a, fake_cupy.FakeCupyArray) for a in other_opt.state.values())
    model.eval(), other.eval()
    fake_cupy.reset_counters()
    same = backend.xp.all(model.forward(x) == other.forward(x))
    assert fake_cupy.stats["transfers"] == 0
    assert bool(same)


def test_confusion_meter_update_on_the_stand_in(fake_cupy):
    from tinyunet.metrics import ConfusionMeter

    rng = np.random.default_rng(0)
    logits_host = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    target_host = rng.integers(0, 3, (2, 5, 4))
    target_host[0, 0, :2] = 255
    logits, target = backend.to_device(logits_host), backend.to_device(target_host)
    meter = ConfusionMeter(3, ignore_index=255)
    fake_cupy.reset_counters()
    meter.update(logits, target)
    meter.update(logits.argmax(axis=1), target)  # class ids work too
    assert fake_cupy.stats["transfers"] == 0, fake_cupy.transfer_log
    cm = meter.matrix()  # the one explicit copy
    assert type(cm) is np.ndarray
    pred = logits_host.argmax(axis=1)
    expected = np.zeros((3, 3), dtype=np.int64)
    for t, p in zip(target_host.ravel(), pred.ravel()):
        if t != 255:
            expected[t, p] += 2
    np.testing.assert_array_equal(cm, expected)


# the child allocates and frees a 64 MB array and prints how much its resident memory dropped
_FREE_AND_MEASURE = """
import numpy as np, sys
from tinyunet import backend
def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:')) / 1024
if sys.argv[-1] == 'keep':
    from tinyunet.accel.allocator import keep_freed_host_memory
    assert keep_freed_host_memory()
a = np.ones(16 * 2 ** 20, dtype=np.float32)   # 64 MB, every page touched
before = rss_mb()
del a
print(before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/status"),
                    reason="glibc malloc and /proc are Linux features")
def test_keep_freed_host_memory_keeps_freed_arrays_for_reuse():
    """By default glibc hands a freed 64 MB block straight back to the OS (RSS drops by ~64 MB);
    after keep_freed_host_memory() it stays in the heap for the next step's arrays (RSS stays)."""
    def dropped(mode: str) -> float:
        proc = subprocess.run([sys.executable, "-c", _FREE_AND_MEASURE, mode], capture_output=True,
                              text=True, timeout=60,
                              env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
        assert proc.returncode == 0, proc.stderr
        return float(proc.stdout)
    assert dropped("default") > 56
    assert dropped("keep") < 8


# ================================================================== kernel launches on a GPU
def test_an_optimizer_step_is_a_handful_of_operations_whatever_the_number_of_parameters(fake_cupy):
    """The parameters live in one flat buffer (tinyunet/optim.py): Adam's step is the same dozen-odd
    array operations for 2 parameter tensors as for 64 (a loop over the tensors would be 8-10 each)."""
    from tinyunet.nn import Parameter
    from tinyunet.optim import Adam

    counts = []
    for tensors in (2, 64):
        params = [Parameter(backend.to_device(np.ones((3, 4), np.float32))) for _ in range(tensors)]
        optimizer = Adam(params, weight_decay=1e-4)
        for p in params:
            p.grad += 1.0
        fake_cupy.reset_counters()
        optimizer.step()
        optimizer.zero_grad()
        counts.append(fake_cupy.stats["launches"])
    assert counts[0] == counts[1] <= 20, counts


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_im2col_is_one_copy_whatever_the_kernel(kernel, fake_cupy):
    """A window view and one copy (plus the padding's): not one copy per kernel offset."""
    from tinyunet.nn.conv import im2col

    x = backend.to_device(np.zeros((2, 3, 9, 8), np.float32))
    fake_cupy.reset_counters()
    cols = im2col(x, kernel, kernel, 1, 1)
    assert cols.shape == (2, 3 * kernel * kernel, (9 + 2 - kernel + 1) * (8 + 2 - kernel + 1))
    # the padding's copy, and the copy into columns (none for a 1x1 kernel: its columns are a view)
    assert fake_cupy.stats["launches"] == (1 if kernel == 1 else 2), dict(fake_cupy.launches)


def test_the_stand_in_counts_launches_and_not_views(fake_cupy):
    """What the launch counter counts: operators, functions, computing methods, assignments; not
    views, allocations, or a reshape that needs no copy."""
    xp = backend.xp
    a = backend.to_device(np.ones((4, 6), np.float32))
    fake_cupy.reset_counters()
    b = a[1:3].reshape(-1)                         # views
    assert a.T.shape == (6, 4)
    c = xp.empty((4, 6), dtype=xp.float32)         # an allocation
    assert fake_cupy.stats["launches"] == 0
    d = a + 1.0
    d *= 2.0
    e = xp.matmul(a, a.T)
    f = e.sum()
    c[...] = d
    g = a.T.reshape(-1)                            # not contiguous: this reshape copies
    assert fake_cupy.stats["launches"] == 6, dict(fake_cupy.launches)
    assert b.shape == (12,) and float(f) == 96.0 and g.shape == (24,)
