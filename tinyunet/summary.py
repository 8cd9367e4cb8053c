"""`tinyunet summary`: a per-layer table of a model — output shape, parameters, FLOPs, and the memory
each layer keeps from forward for its backward pass.

The memory column is *measured*, not estimated: one training-mode forward pass runs on a zero input,
then every layer's saved arrays (im2col matrices, masks, normalised inputs, argmax indices) are
added up. The implementation column says what computed each layer: ``reference`` (tinyunet/nn, the
lessons' code), or the CPU acceleration's choice for this shape (tinyunet/accel/choose.py). It shows where a U-Net's memory goes: the full-resolution levels hold most of it, and each
pooling step divides the next level's share by four while the channels only double.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import numpy as np

from tinyunet.backend import xp
from tinyunet.nn import Conv2d, ConvTranspose2d, Module, Parameter


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: Tuple[int, ...]
    parameters: int
    saved_bytes: int  # kept from forward for backward
    flops: int  # forward multiply-adds x 2 (of the direct sum, whatever the implementation)
    implementation: str = "reference"  # what computed the layer: the reference, or an accelerated one


def _arrays(value: Any) -> Iterator[Any]:
    """Every array inside an attribute (arrays, tuples/lists of arrays; not parameters)."""
    if hasattr(value, "nbytes") and hasattr(value, "shape"):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _arrays(v)


def saved_bytes(module: Module, counted: Optional[Set[int]] = None) -> int:
    """Bytes of the arrays a leaf module holds between forward and backward (buffers excluded).

    ``counted``: ids of array buffers already charged to earlier layers. Layers share what they keep
    (a ReLU keeps its output, and the next convolution keeps that same array as its input), so each
    buffer is charged once, to the first layer that holds it, and the column adds up to the total.
    """
    counted = set() if counted is None else counted
    total = 0
    kept = [value for name, value in vars(module).items()
            if not isinstance(value, (Module, Parameter)) and name not in module.buffer_names]
    fast = getattr(module, "fast", None)   # an accelerated implementation keeps its own arrays
    if fast is not None:
        kept += [value for name, value in vars(fast).items() if name != "layer"]
    for value in kept:
        for a in _arrays(value):
            base = a
            while getattr(base, "base", None) is not None:  # a view shares its base's memory
                base = base.base
            if id(base) not in counted:
                counted.add(id(base))
                total += int(base.nbytes)
    return total


def layer_flops(module: Module, out_shape: Tuple[int, ...], in_shape: Tuple[int, ...]) -> int:
    """2 x multiply-adds of the forward pass of a convolution layer (0 for the cheap elementwise ones)."""
    if isinstance(module, Conv2d):
        kh, kw = module.kernel_size
        return 2 * int(np.prod(out_shape)) * module.in_channels * kh * kw
    if isinstance(module, ConvTranspose2d):
        kh, kw = module.kernel_size
        return 2 * int(np.prod(in_shape)) * module.out_channels * kh * kw
    return 0


def summarize(model: Module, input_shape: Tuple[int, ...]) -> List[LayerRow]:
    """Run one training-mode forward on zeros of ``input_shape`` and describe every leaf layer, in
    the order the forward pass first calls them (down.0, pool.0, down.1, ...), not the order they
    were registered in (all encoder blocks, then all pools, ...)."""
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.named_children())]
    shapes: Dict[int, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}  # insertion order = call order

    def recording(module: Module) -> Any:
        original = type(module).forward

        def forward(*inputs: Any) -> Any:
            out = original(module, *inputs)
            shapes.setdefault(id(module), (tuple(inputs[0].shape), tuple(out.shape)))
            return out
        return forward

    for _, m in leaves:
        m.forward = recording(m)  # an instance attribute shadows the class's forward for this run
    try:
        model.train()
        model.forward(xp.zeros(input_shape, dtype=xp.float32))
    finally:
        for _, m in leaves:
            del m.forward
    rows = []
    counted: Set[int] = set()
    by_id = {id(m): (name, m) for name, m in leaves}
    for key, (in_shape, out_shape) in shapes.items():
        name, m = by_id[key]
        params = sum(int(np.prod(p.shape)) for _, p in m.named_parameters())
        fast = getattr(m, "fast", None)
        rows.append(LayerRow(name, type(m).__name__, out_shape, params, saved_bytes(m, counted),
                             layer_flops(m, out_shape, in_shape), fast.name if fast is not None else "reference"))
    for _, m in leaves:  # drop what the forward kept: this model is not going to run backward
        for attr, value in list(vars(m).items()):
            if attr == "fast" or (not isinstance(value, (Module, Parameter)) and attr not in m.buffer_names
                                  and next(_arrays(value), None) is not None):
                setattr(m, attr, None)
    return rows


def format_summary(rows: List[LayerRow]) -> str:
    """The table printed by ``tinyunet summary``, with totals."""
    mb = 1024 ** 2
    header = (f"{'layer':<22}{'type':<17}{'output shape':<22}{'params':>10}{'saved MB':>10}{'MFLOPs':>10}"
              "  implementation")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.name:<22}{r.kind:<17}{str(r.output_shape):<22}{r.parameters:>10,}"
                     f"{r.saved_bytes / mb:>10.2f}{r.flops / 1e6:>10.1f}  {r.implementation}".rstrip())
    total_params = sum(r.parameters for r in rows)
    total_saved = sum(r.saved_bytes for r in rows)
    total_flops = sum(r.flops for r in rows)
    lines += ["-" * len(header),
              f"{'total':<61}{total_params:>10,}{total_saved / mb:>10.1f}{total_flops / 1e6:>10.1f}",
              f"forward {total_flops / 1e9:.2f} GFLOP; a training step (forward + backward) is about "
              f"3x that: {3 * total_flops / 1e9:.2f} GFLOP; kept for backward: {total_saved / mb:.0f} MB",
              "implementation: reference (tinyunet/nn) or the CPU acceleration's choice for this shape "
              "(tinyunet/accel/choose.py); MFLOPs count the direct sum (winograd multiplies 16/36 of it)"]
    return "\n".join(lines)
