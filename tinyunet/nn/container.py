"""Sequential: run modules one after the other; backward runs them in reverse."""
from __future__ import annotations

from typing import Any, Iterator, Tuple

from tinyunet.nn.module import Module


class Sequential(Module):
    def __init__(self, *layers: Module) -> None:
        self.layers = list(layers)

    def named_children(self) -> Iterator[Tuple[str, Module]]:
        # PyTorch names Sequential children "0", "1", ... (no attribute name in front)
        for i, layer in enumerate(self.layers):
            yield str(i), layer

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: Any) -> Any:
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dout: Any) -> Any:
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout
