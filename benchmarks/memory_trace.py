"""Where does a training step's memory peak? The traced NumPy memory after each layer's forward and
backward, and the peak reached inside each call.

    python benchmarks/memory_trace.py                   # standard configuration (batch 8)
    python benchmarks/memory_trace.py --batch-size 1 --top 10

Memory is NumPy's array buffers as reported to tracemalloc, relative to the level just before the
step (parameters, gradients and Adam's state already exist: one warm-up step runs first). "kept" is
the memory alive when the call returns; "peak" is the highest level during the call, so peak - kept
is what the call needed only while it ran (its temporaries). Sorted by peak, highest first.
"""
from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from typing import Any, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (same folder: its Harness builds the model, data, loss and optimizer)


def trace(argv: Optional[List[str]] = None) -> Tuple[List[Tuple[str, float, float]], float]:
    """[(layer call, kept MB, peak MB)] for one step, and the step's overall peak in MB."""
    args = train_step.parse_args([a for a in (argv or []) if not a.startswith("--top")])
    h = train_step.Harness(args)
    h.step()
    rows: List[Tuple[str, float, float]] = []
    base = 0

    def wrap(module: Any, name: str) -> None:
        for kind in ("forward", "backward"):
            original = getattr(module, kind)

            def timed(*a: Any, _f: Any = original, _label: str = f"{name}.{kind}") -> Any:
                out = _f(*a)
                current, peak = tracemalloc.get_traced_memory()
                rows.append((_label, (current - base) / 2 ** 20, (peak - base) / 2 ** 20))
                tracemalloc.reset_peak()
                return out
            setattr(module, kind, timed)

    for name, module in h.model.named_modules():
        if not list(module.named_children()):
            wrap(module, f"{name} ({type(module).__name__})")
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    h.step()
    tracemalloc.stop()
    return rows, max(peak for _, _, peak in rows)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = 15
    for i, a in enumerate(argv):
        if a == "--top":
            top = int(argv[i + 1])
            argv = argv[:i] + argv[i + 2:]
            break
    rows, peak = trace(argv)
    print(f"step peak {peak:.1f} MB above the level before the step (tracemalloc, NumPy buffers)")
    print(f"{'layer call':44s} {'kept MB':>8s} {'peak MB':>8s} {'temp MB':>8s}")
    for label, kept, high in sorted(rows, key=lambda r: -r[2])[:top]:
        print(f"{label:44s} {kept:8.1f} {high:8.1f} {high - kept:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
