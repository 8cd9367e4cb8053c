"""Gradient checking: compare a layer's hand-written backward with finite differences.

For a scalar function f of an array x, the central difference

    df/dx[i] ~ (f(x + h e_i) - f(x - h e_i)) / (2h)

has error O(h^2). In float64 with h = 1e-6 that leaves about 1e-10 of truncation and rounding
error, so a correct backward agrees to ~1e-8 relative error and a wrong one is off by O(1).

To check a module we make the scalar ``f = sum(forward(x) * g)`` for a fixed random ``g``: then
df/d(output) = g, so ``backward(g)`` must return df/dx and put df/dW into each ``param.grad``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from tinyunet.backend import to_host, xp


def relative_error(analytic: Any, numeric: Any) -> float:
    """max_i |a_i - n_i| / max(max_i |a_i|, max_i |n_i|): 0 means identical, ~1 means unrelated.

    The error is measured against the tensor's largest entry rather than entry by entry: finite
    differences carry an absolute noise of about eps * |f| / h ~ 1e-10, which makes an entry-wise
    ratio meaningless for the many near-zero entries of a deep network's gradient, while a wrong
    backward is still off by O(1) on its large entries.
    """
    a, n = to_host(analytic).astype(np.float64), to_host(numeric).astype(np.float64)
    if not a.size:
        return 0.0
    scale = max(np.abs(a).max(), np.abs(n).max(), 1e-300)
    return float(np.abs(a - n).max() / scale)


def numerical_gradient(f: Callable[[], float], x: Any, h: float = 1e-6, indices: Optional[Any] = None) -> Any:
    """Central differences of the scalar ``f()`` with respect to every entry of ``x`` (changed in place
    and restored). One loop over entries: fine for the small arrays of a check, never for training.

    ``indices``: flat indices of the only entries to compute (the others stay 0); default all.
    """
    grad = xp.zeros(x.shape, dtype=x.dtype)
    # index with n-d tuples rather than a flat view: x may be a non-contiguous view (a transposed
    # layout), where reshape(-1) would silently give a copy and the nudges would never reach x
    positions = np.ndindex(*x.shape) if indices is None else (np.unravel_index(i, x.shape) for i in indices)
    for idx in positions:
        old = x[idx].item()
        x[idx] = old + h
        plus = f()
        x[idx] = old - h
        minus = f()
        x[idx] = old
        grad[idx] = (plus - minus) / (2 * h)
    return grad


def check_module(module: Any, *inputs: Any, seed: int = 0, h: float = 1e-6) -> Dict[str, float]:
    """Check every input gradient and every parameter gradient of ``module``.

    inputs: float64 arrays; module parameters must be float64 too (``module.double()``).
    Returns {"input0": err, ..., "<param name>": err} with max relative errors.
    """
    rng = np.random.default_rng(seed)
    out = module.forward(*inputs)
    # the upstream gradient in the output's memory layout, as the next layer would send it (so that a
    # channels-last output gets a channels-last gradient: the compiled loops run backward too)
    g = xp.empty_like(out)
    g[...] = xp.asarray(rng.standard_normal(out.shape))

    def f() -> float:
        return float((module.forward(*inputs) * g).sum())

    module.zero_grad()
    module.forward(*inputs)
    dinputs = module.backward(g)
    if not isinstance(dinputs, tuple):
        dinputs = (dinputs,)
    errors = {}
    for k, (x, dx) in enumerate(zip(inputs, dinputs)):
        errors[f"input{k}"] = relative_error(dx, numerical_gradient(f, x, h))
    for name, p in module.named_parameters():
        analytic = p.grad.copy()
        errors[name] = relative_error(analytic, numerical_gradient(f, p.data, h))
    return errors


def check_loss(loss: Any, logits: Any, target: Any, h: float = 1e-6) -> float:
    """Check ``loss.backward()`` (dlogits) against finite differences of ``loss.forward``."""
    loss.forward(logits, target)
    analytic = loss.backward()
    numeric = numerical_gradient(lambda: float(loss.forward(logits, target)), logits, h)
    return relative_error(analytic, numeric)


# above this error a model tensor is checked again with a 10x smaller step (check_model_with_loss)
KINK_RETRY_ERROR = 1e-7


def check_model_with_loss(model: Any, loss: Any, x: Any, target: Any, h: float = 1e-6,
                          max_entries: Optional[int] = None, seed: int = 0) -> Dict[str, float]:
    """End to end: d(loss)/d(input) and d(loss)/d(every parameter) of ``loss(model(x), target)``.

    BatchNorm in train mode updates running statistics on every forward; they do not affect the
    output in train mode, so the repeated forwards of the check are still the same function.

    ``max_entries``: check at most this many randomly chosen entries of each tensor (every tensor is
    still checked; smaller ones entirely). Each entry costs two forwards, so a whole model of ~8,000
    parameters takes ~30 s; 20 entries per tensor take ~2 s and still catch a wrong backward, which
    is off on most entries of the tensor it gets wrong.

    A tensor whose error exceeds ``KINK_RETRY_ERROR`` is checked again with steps h/10 and 10h and the
    smallest error is reported (see the comment in ``error``).
    """
    rng = np.random.default_rng(seed)

    def f() -> float:
        return float(loss.forward(model.forward(x), target))

    def error_at(analytic: Any, array: Any, chosen: Optional[Any], step: float) -> float:
        if chosen is None:
            return relative_error(analytic, numerical_gradient(f, array, step))
        numeric = numerical_gradient(f, array, step, indices=chosen)
        return relative_error(to_host(analytic).reshape(-1)[chosen], to_host(numeric).reshape(-1)[chosen])

    def error(analytic: Any, array: Any) -> float:
        chosen = None
        if max_entries is not None and array.size > max_entries:
            chosen = np.sort(rng.choice(array.size, max_entries, replace=False))
        err = error_at(analytic, array, chosen, h)
        if err > KINK_RETRY_ERROR:
            # A right backward can still disagree with one step size, for two reasons. Kinks (ReLU at 0,
            # max-pool switching its maximum): a difference x +- h that steps across one is off by O(1);
            # a smaller step crosses it far less often. Rounding: the difference of two losses near 1
            # carries ~1e-16 / h of noise, large against a tensor whose gradient is tiny (1e-5, deep in
            # an attention gate); a larger step shrinks it. A wrong backward stays wrong at every step.
            err = min(err, error_at(analytic, array, chosen, h / 10), error_at(analytic, array, chosen, h * 10))
        return err

    model.zero_grad()
    loss.forward(model.forward(x), target)
    dx = model.backward(loss.backward())
    errors = {"input": error(dx, x)}
    for name, p in model.named_parameters():
        errors[name] = error(p.grad.copy(), p.data)
    return errors


def run_all(seed: int = 0, tolerance: float = 1e-6, model_tolerance: float = 1e-5,
            full: bool = False) -> List[Tuple[str, str, float, bool]]:
    """The ``tinyunet gradcheck`` suite: every layer, the loss and small models, in float64.

    Every layer and the loss are checked entry by entry. The models are checked through the loss on
    50 (U-Net) or 20 (ResUNet, Attention U-Net, whose blocks are checked whole on their own) random
    entries of every tensor, which keeps the suite to seconds; ``full=True`` checks every entry of
    the U-Net (about 30 s; the test suite does that too).

    Returns rows (module, tensor, max relative error, passed).
    """
    from tinyunet.backend import seed as seed_all
    from tinyunet.losses import CrossEntropyLoss
    from tinyunet.models import AttentionUNet, ResUNet, UNet
    from tinyunet.models.attention_unet import AttentionGate
    from tinyunet.models.resunet import ResidualBlock
    from tinyunet.nn import (Add, BatchNorm2d, Concat, Conv2d, ConvTranspose2d, MaxPool2d, Multiply, ReLU,
                             Sigmoid, Upsample)

    seed_all(seed)
    rng = np.random.default_rng(seed)

    def randn(*shape: int) -> Any:
        return xp.asarray(rng.standard_normal(shape))

    def away_from_zero(*shape: int) -> Any:
        # ReLU has a kink at 0: keep every input at least 0.1 away so x +- h never crosses it
        v = rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
        return xp.asarray(v)

    def channels_last(a: Any) -> Any:
        # the memory layout the convolutions hand over: where Numba is installed, BatchNorm and ReLU
        # then run their compiled loops (tinyunet/kernels.py) instead of their NumPy passes
        return xp.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    def distinct(*shape: int) -> Any:
        # max-pool is not differentiable at ties: a shuffled grid of values 0.01 apart has none
        v = rng.permutation(np.prod(shape)).reshape(shape) * 0.01
        return xp.asarray(v.astype(np.float64))

    cases = [
        ("Conv2d(3,4,k3,s1,p1)", Conv2d(3, 4, 3, padding=1).double(), (randn(2, 3, 7, 6),)),
        ("Conv2d(2,3,k5,s2,p2)", Conv2d(2, 3, 5, stride=2, padding=2).double(), (randn(2, 2, 9, 8),)),
        ("Conv2d(5,3,k3,s1,p1)", Conv2d(5, 3, 3, padding=1).double(), (randn(2, 5, 6, 4),)),
        ("Conv2d(5,3,k3,s2,p1)", Conv2d(5, 3, 3, stride=2, padding=1).double(), (randn(2, 5, 7, 6),)),
        ("Conv2d(4,3,k1,s1,p0)", Conv2d(4, 3, 1).double(), (randn(2, 4, 5, 3),)),
        ("MaxPool2d(2)", MaxPool2d(2), (distinct(2, 3, 6, 7),)),
        ("MaxPool2d(3,s2)", MaxPool2d(3, 2), (distinct(2, 2, 7, 7),)),
        ("ConvTranspose2d(4,3,k2,s2)", ConvTranspose2d(4, 3, 2, stride=2).double(), (randn(2, 4, 3, 5),)),
        ("ConvTranspose2d(2,3,k3,s2,p1)", ConvTranspose2d(2, 3, 3, stride=2, padding=1).double(), (randn(2, 2, 4, 3),)),
        ("Concat(axis=1)", Concat(1), (randn(2, 2, 3, 3), randn(2, 3, 3, 3))),
        ("ReLU", ReLU(), (away_from_zero(2, 3, 4, 5),)),
        ("BatchNorm2d(train)", BatchNorm2d(3).double(), (randn(4, 3, 3, 2),)),
        ("BatchNorm2d(eval)", BatchNorm2d(3).double().eval(), (randn(2, 3, 3, 2),)),
        ("ReLU(channels-last)", ReLU(), (channels_last(away_from_zero(2, 3, 4, 5)),)),
        ("BatchNorm2d(train,channels-last)", BatchNorm2d(3).double(), (channels_last(randn(4, 3, 3, 2)),)),
        ("BatchNorm2d(eval,channels-last)", BatchNorm2d(3).double().eval(), (channels_last(randn(2, 3, 3, 2)),)),
        ("Sigmoid", Sigmoid(), (3 * randn(2, 3, 4, 5),)),
        ("Add(broadcast)", Add(), (randn(2, 3, 4, 5), randn(3, 1, 1))),
        ("Multiply(broadcast)", Multiply(), (randn(2, 3, 4, 5), randn(2, 1, 4, 5))),
        ("Upsample(2,nearest)", Upsample(2), (randn(2, 3, 3, 4),)),
        ("Upsample(2,bilinear)", Upsample(2, "bilinear"), (randn(2, 3, 3, 4),)),
        ("ResidualBlock(2,3)", ResidualBlock(2, 3).double(), (randn(2, 2, 5, 4),)),
        ("ResidualBlock(3,3)", ResidualBlock(3, 3).double(), (randn(2, 3, 5, 4),)),
        ("AttentionGate(3,4,2)", AttentionGate(3, 4, 2).double(), (randn(2, 3, 6, 4), randn(2, 4, 3, 2))),
    ]
    rows = []
    for label, module, inputs in cases:
        if label.startswith("BatchNorm2d"):  # non-trivial affine parameters make the check stronger
            module.weight.data = randn(3)
            module.bias.data = randn(3)
            if not module.training:
                module.running_mean, module.running_var = randn(3), xp.asarray(rng.uniform(0.5, 2.0, 3))
        for tensor, err in check_module(module, *inputs, seed=seed).items():
            rows.append((label, tensor, err, err <= tolerance))

    logits, target = randn(2, 3, 4, 5), xp.asarray(rng.integers(0, 3, (2, 4, 5)))
    for label, loss in [("CrossEntropyLoss", CrossEntropyLoss()),
                        ("CrossEntropyLoss(weight, ignore_index)",
                         CrossEntropyLoss(weight=np.array([0.5, 2.0, 1.0]), ignore_index=2))]:
        err = check_loss(loss, logits, target)
        rows.append((label, "logits", err, err <= tolerance))

    # the models draw from fresh generators: their weights and inputs do not change when a layer
    # case is added above
    seed_all(seed)
    rng = np.random.default_rng([seed, 1])
    for arch, max_entries in ((UNet, None if full else 50), (ResUNet, 20), (AttentionUNet, 20)):
        model = arch(in_channels=3, num_classes=3, base_channels=4, depth=2).double()
        x, target = randn(2, 3, 16, 16), xp.asarray(rng.integers(0, 3, (2, 16, 16)))
        errors = check_model_with_loss(model, CrossEntropyLoss(), x, target, max_entries=max_entries, seed=seed)
        for tensor, err in errors.items():
            rows.append((f"{arch.__name__}(base 4, depth 2)", tensor, err, err <= model_tolerance))
    return rows
