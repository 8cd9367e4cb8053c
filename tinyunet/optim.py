"""Optimizers: turn gradients into parameter updates (the same rules as PyTorch's SGD and Adam).

Every parameter of the model moves into one flat buffer, and every gradient into another: each
``p.data`` and ``p.grad`` becomes a view of its slice (the layers never notice: they read ``p.data``
and add into ``p.grad`` in place). An update is then a handful of whole-array operations for the
whole model rather than a handful per parameter tensor - on a GPU each operation is a kernel launch,
and the standard U-Net has 64 tensors (lesson 15). The optimizer's own state (Adam's m and v) is flat
too, and ``update`` works on any slice of the buffers, since every entry is updated on its own.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import numpy as np

from tinyunet.backend import to_device, to_host, xp
from tinyunet.nn.module import Parameter, accelerated


def flatten(params: List[Parameter]) -> Tuple[Any, Any]:
    """Copy the parameters' data and gradients into one flat buffer each and make every ``p.data``
    and ``p.grad`` a view of its slice. -> (data, grad), 1-D arrays of the total size."""
    dtypes = {p.data.dtype for p in params}
    if len(dtypes) > 1:
        raise ValueError(f"an optimizer takes parameters of one dtype, got {sorted(str(d) for d in dtypes)}")
    total = sum(p.data.size for p in params)
    dtype = dtypes.pop() if dtypes else xp.float32
    data, grad = xp.empty(total, dtype=dtype), xp.empty(total, dtype=dtype)
    start = 0
    for p in params:
        stop = start + p.data.size
        data[start:stop], grad[start:stop] = p.data.ravel(), p.grad.ravel()
        p.data, p.grad = data[start:stop].reshape(p.shape), grad[start:stop].reshape(p.shape)
        start = stop
    return data, grad


class Optimizer:
    #: names of the per-parameter state arrays (e.g. Adam's "m" and "v")
    slots: Tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        self.params: List[Parameter] = list(params)
        self.lr = lr
        self.t = 0  # number of steps taken
        self.data, self.grad = flatten(self.params)
        self._views = [(p.data, p.grad) for p in self.params]
        self.state: Dict[str, Any] = {s: xp.zeros_like(self.data) for s in self.slots}
        self.fast: Any = None

    def _flat(self) -> None:
        """Flatten again if a parameter's array was replaced since (e.g. ``model.to(...)``)."""
        if any(p.data is not data or p.grad is not grad for p, (data, grad) in zip(self.params, self._views)):
            self.data, self.grad = flatten(self.params)
            self._views = [(p.data, p.grad) for p in self.params]

    def zero_grad(self) -> None:
        self._flat()
        self.grad[...] = 0

    def step(self) -> None:
        self._flat()
        self.t += 1
        self.fast = accelerated(self)     # the CPU acceleration (blocks on every core), or None
        if self.fast:
            self.fast.step()
        else:
            self.update(self.data, self.grad, self.state)

    def update(self, data: Any, grad: Any, state: Dict[str, Any]) -> None:
        """Update ``data`` in place from ``grad``: equal slices of the flat buffers, and of each state
        array in ``state`` (by slot name)."""
        raise NotImplementedError

    def _slices(self) -> List[slice]:
        """Where each parameter lies in the flat buffers."""
        bounds = np.cumsum([0] + [p.data.size for p in self.params])
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Flat host arrays: ``step``, ``lr`` and ``<slot>.<i>`` (parameter i's shape) for each parameter i."""
        state = {"step": np.array(self.t), "lr": np.array(self.lr)}
        for slot, flat in self.state.items():
            state.update({f"{slot}.{i}": to_host(flat[s]).reshape(p.shape).copy()
                          for i, (p, s) in enumerate(zip(self.params, self._slices()))})
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a state of another optimizer or model is a ``ValueError``."""
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"optimizer state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for slot in self.state:
            for i, (p, s) in enumerate(zip(self.params, self._slices())):
                value = state[f"{slot}.{i}"]
                if tuple(value.shape) != p.shape:
                    raise ValueError(f"optimizer state {slot}.{i} has shape {value.shape}, expected {p.shape}")
        self.t = int(state["step"])
        self.lr = float(state["lr"])
        for slot, flat in self.state.items():
            for i, s in enumerate(self._slices()):
                flat[s] = to_device(state[f"{slot}.{i}"], flat.dtype).ravel()


class SGD(Optimizer):
    """v = momentum * v + (g + weight_decay * w);  w -= lr * v   (PyTorch's form, no dampening)."""

    def __init__(self, params: Iterable[Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.slots = ("velocity",) if momentum else ()
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay

    def update(self, data: Any, grad: Any, state: Dict[str, Any]) -> None:
        g = grad + self.weight_decay * data if self.weight_decay else grad
        if self.momentum:
            v = state["velocity"]
            # PyTorch starts the buffer at the first gradient rather than at momentum * 0 + g: same thing
            v *= self.momentum
            v += g
            g = v
        data -= self.lr * g


class Adam(Optimizer):
    """m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  w -= lr * m_hat / (sqrt(v_hat) + eps),
    with bias corrections m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t) (PyTorch's Adam; weight decay
    added to the gradient, i.e. L2, not AdamW)."""

    slots = ("m", "v")

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def update(self, data: Any, grad: Any, state: Dict[str, Any]) -> None:
        b1, b2 = self.betas
        g = grad + self.weight_decay * data if self.weight_decay else grad
        m, v = state["m"], state["v"]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        bias1, bias2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        # PyTorch: denom = sqrt(v) / sqrt(bias2) + eps; step = lr / bias1
        denom = xp.sqrt(v) / (bias2 ** 0.5) + self.eps
        data -= (self.lr / bias1) * m / denom
