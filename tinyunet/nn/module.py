"""Module and Parameter: the two small objects every layer is built from.

A :class:`Module` has ``forward(*inputs) -> output`` and ``backward(dout) -> dinput``. Forward keeps on
``self`` exactly what backward needs; backward returns the gradient with respect to the input and
*adds* the gradient of each parameter into ``param.grad`` (so gradients of several batches can be
accumulated, as in PyTorch). Children are found by looking at the module's attributes: a Module,
a Parameter, or a list of Modules. That is all the "framework" there is.

:func:`accelerated` is the one door to the CPU acceleration (tinyunet/accel): a layer that has a
faster CPU version asks it first thing in forward, and runs the code below it (the reference) when
the answer is None.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

from tinyunet import backend
from tinyunet.backend import to_device, to_host, xp


def accelerated(layer: Any, *inputs: Any) -> Any:
    """The CPU acceleration's implementation of ``layer`` for these inputs, or None.

    An implementation computes the layer's numbers faster on a CPU (tinyunet/accel, lesson 17): its
    ``forward(*inputs)`` runs instead of the layer's own code, and the layer keeps it so that
    ``backward`` runs its ``backward(dout)``, i.e. what forward chose. None - on CuPy, with
    ``TINYUNET_ACCEL=0``, or for an input no implementation takes - means: run the reference.
    """
    if not backend.accelerate():
        return None
    from tinyunet.accel.choose import choose   # imported only where it may run
    return choose(layer, *inputs)


class Parameter:
    """A learnable array ``data`` and its gradient ``grad`` (same shape and dtype)."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.grad = xp.zeros_like(data)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.data.dtype})"


class Module:
    """Base class of layers and models (PyTorch-shaped API)."""

    training: bool = True
    #: names of non-learnable arrays saved in ``state_dict`` (BatchNorm's running statistics)
    buffer_names: Tuple[str, ...] = ()

    def forward(self, *inputs: Any) -> Any:
        raise NotImplementedError

    def backward(self, dout: Any) -> Any:
        raise NotImplementedError

    def __call__(self, *inputs: Any) -> Any:
        return self.forward(*inputs)

    # --- walking the tree -------------------------------------------------------------------
    def named_children(self) -> Iterator[Tuple[str, "Module"]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                for i, child in enumerate(value):
                    yield f"{name}.{i}", child

    def modules(self) -> Iterator["Module"]:
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        """(dotted name, module) for this module ("" for itself) and every descendant, depth first."""
        yield prefix.rstrip("."), self
        for name, child in self.named_children():
            yield from child.named_modules(prefix + name + ".")

    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, Parameter]]:
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self) -> List[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[Tuple[str, Any]]:
        for name in self.buffer_names:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(prefix + name + ".")

    # --- training state ---------------------------------------------------------------------
    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad[...] = 0

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def to(self, dtype: Any) -> "Module":
        """Cast every parameter and buffer to ``dtype`` (float64 for gradient checks)."""
        for m in self.modules():
            for name, value in vars(m).items():
                if isinstance(value, Parameter):
                    value.data = value.data.astype(dtype)
                    value.grad = value.grad.astype(dtype)
            for name in m.buffer_names:
                setattr(m, name, getattr(m, name).astype(dtype))
        return self

    def double(self) -> "Module":
        return self.to(xp.float64)

    def float(self) -> "Module":
        return self.to(xp.float32)

    def num_parameters(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.parameters()))

    # --- saving and loading -----------------------------------------------------------------
    def state_dict(self) -> Dict[str, np.ndarray]:
        """Parameters and buffers by dotted name, as NumPy arrays on the host."""
        state = {name: to_host(p.data).copy() for name, p in self.named_parameters()}
        state.update({name: to_host(b).copy() for name, b in self.named_buffers()})
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Copy arrays into this module; names and shapes must match exactly (else ``ValueError``)."""
        own = dict(self.named_parameters())
        buffers = {name for name, _ in self.named_buffers()}
        expected = set(own) | buffers
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"state does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name in sorted(expected):
            value = state[name]
            current = own[name].data if name in own else self._get_buffer(name)
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(
                    f"shape mismatch for {name!r}: checkpoint has {tuple(value.shape)}, "
                    f"model expects {tuple(current.shape)}"
                )
            array = to_device(value, current.dtype)
            if name in own:
                own[name].data[...] = array    # in place: an optimizer's flat buffer keeps holding it
            else:
                self._set_buffer(name, array.copy())

    def _owner(self, dotted: str) -> Tuple["Module", str]:
        *path, leaf = dotted.split(".")
        module: Module = self
        children = dict(self.named_children())
        i = 0
        while i < len(path):
            # list children are named "attr.i": consume two parts at once when needed
            key = path[i] if path[i] in children else ".".join(path[i:i + 2])
            module = children[key]
            i += 1 if key == path[i] else 2
            children = dict(module.named_children())
        return module, leaf

    def _get_buffer(self, dotted: str) -> Any:
        module, leaf = self._owner(dotted)
        return getattr(module, leaf)

    def _set_buffer(self, dotted: str, value: Any) -> None:
        module, leaf = self._owner(dotted)
        setattr(module, leaf, value)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in children:
            lines += ["  " + line for line in f"({name}): {child!r}".splitlines()]
        return "\n".join(lines + [")"])
