"""Optimizers: turn gradients into parameter updates (the same rules as PyTorch's SGD and Adam)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from tinyunet.backend import to_device, to_host, xp
from tinyunet.nn.module import Parameter
from tinyunet.parallel import ELEMENTWISE_WORK, map_row_blocks

# an optimizer's update reads and writes each parameter's arrays about this many times (Adam: ~15)
_UPDATE_PASSES = 15


class Optimizer:
    #: names of the per-parameter state arrays (e.g. Adam's "m" and "v")
    slots: Tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        self.params: List[Parameter] = list(params)
        self.lr = lr
        self.t = 0  # number of steps taken
        self._param_groups: Optional[List[List[int]]] = None  # see _groups
        self.state: Dict[str, List[Any]] = {s: [xp.zeros_like(p.data) for p in self.params] for s in self.slots}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad[...] = 0

    def step(self) -> None:
        self.t += 1
        groups = self._groups()

        def some_groups(first: int, last: int) -> None:
            for group in groups[first:last]:
                for i in group:
                    self.update(i, self.params[i])
        # each parameter's update is independent of the others': groups of parameters in parallel on
        # the CPU (tinyunet/parallel.py; Adam on the standard U-Net's 1.9M parameters: 6.0-7.0 -> 4.7-4.9 ms)
        largest = max((sum(self.params[i].data.size for i in group) for group in groups), default=0)
        map_row_blocks(some_groups, len(groups), largest * _UPDATE_PASSES * ELEMENTWISE_WORK)

    def _groups(self, count: int = 4) -> List[List[int]]:
        """The parameters' indices in ``count`` groups of about the same total size (the biggest
        first, each into the smallest group so far); the same every step."""
        if self._param_groups is None:
            groups: List[List[int]] = [[] for _ in range(count)]
            sizes = [0] * count
            for i in sorted(range(len(self.params)), key=lambda i: -self.params[i].data.size):
                smallest = sizes.index(min(sizes))
                groups[smallest].append(i)
                sizes[smallest] += self.params[i].data.size
            self._param_groups = [group for group in groups if group]
        return self._param_groups

    def update(self, i: int, p: Parameter) -> None:
        """Update parameter i (``p``) from its gradient. Called for the parameters in groups on
        several threads at once: touch only parameter i's arrays and state."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Flat host arrays: ``step``, ``lr`` and ``<slot>.<i>`` for each parameter i."""
        state = {"step": np.array(self.t), "lr": np.array(self.lr)}
        for slot, arrays in self.state.items():
            state.update({f"{slot}.{i}": to_host(a).copy() for i, a in enumerate(arrays)})
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a state of another optimizer or model is a ``ValueError``."""
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"optimizer state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.t = int(state["step"])
        self.lr = float(state["lr"])
        for slot, arrays in self.state.items():
            for i, a in enumerate(arrays):
                value = state[f"{slot}.{i}"]
                if tuple(value.shape) != tuple(a.shape):
                    raise ValueError(f"optimizer state {slot}.{i} has shape {value.shape}, expected {a.shape}")
                arrays[i] = to_device(value, a.dtype).copy()


class SGD(Optimizer):
    """v = momentum * v + (g + weight_decay * w);  w -= lr * v   (PyTorch's form, no dampening)."""

    def __init__(self, params: Iterable[Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.slots = ("velocity",) if momentum else ()
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay

    def update(self, i: int, p: Parameter) -> None:
        g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
        if self.momentum:
            v = self.state["velocity"][i]
            # PyTorch starts the buffer at the first gradient rather than at momentum * 0 + g: same thing
            v *= self.momentum
            v += g
            g = v
        p.data -= self.lr * g


class Adam(Optimizer):
    """m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  w -= lr * m_hat / (sqrt(v_hat) + eps),
    with bias corrections m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t) (PyTorch's Adam; weight decay
    added to the gradient, i.e. L2, not AdamW)."""

    slots = ("m", "v")

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def update(self, i: int, p: Parameter) -> None:
        b1, b2 = self.betas
        g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
        m, v = self.state["m"][i], self.state["v"][i]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        bias1, bias2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        # PyTorch: denom = sqrt(v) / sqrt(bias2) + eps; step = lr / bias1
        denom = xp.sqrt(v) / (bias2 ** 0.5) + self.eps
        p.data -= (self.lr / bias1) * m / denom
