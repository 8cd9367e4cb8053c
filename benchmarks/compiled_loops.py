"""What do the compiled loops, the direct convolution kernels, or the whole CPU acceleration buy inside a training step?

    python benchmarks/compiled_loops.py                 # standard configuration, 30 pairs of steps
    python benchmarks/compiled_loops.py --pairs 40 --batch-size 1
    python benchmarks/compiled_loops.py --convolutions  # accel/direct_kernels.py against BLAS's products
    python benchmarks/compiled_loops.py --reference --pairs 5   # the reference layers against the acceleration

One process, one model: steps alternate between BatchNorm/ReLU as NumPy passes and as Numba loops
(``compiled_loops.set_enabled``; the convolutions on BLAS both ways), or with ``--convolutions``
between the shifted convolutions on BLAS and on the direct kernels (``direct_kernels.set_enabled``;
the loops on both ways), or with ``--reference`` between the reference layers alone (tinyunet/nn,
``backend.set_acceleration(False)``) and the whole acceleration, in the order A B, B A, A B, ... so
that a machine getting slower or faster weighs on both alike. Each call of the layers concerned is timed inside the steps. Printed: the median per step of
each layer type and direction, their total, the step medians, and the median of the per-pair ratios
compiled / not (the figure to quote: on shared machines the step time itself swings by 20-40%
within minutes). Takes the options of train_step.py for the configuration.
"""
from __future__ import annotations

import collections
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (the same Harness as the step benchmark)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs = 30
    if "--pairs" in argv:
        i = argv.index("--pairs")
        pairs = int(argv[i + 1])
        del argv[i:i + 2]
    convolutions, reference = "--convolutions" in argv, "--reference" in argv
    for flag in ("--convolutions", "--reference"):
        if flag in argv:
            argv.remove(flag)
    args = train_step.parse_args(argv)
    from tinyunet import backend
    from tinyunet.accel import compiled_loops as kernels
    from tinyunet.accel import direct_kernels as direct_conv
    if not kernels.available() and not reference:
        print("Numba is not installed (pip install -e '.[fast]'): both sides would run the NumPy passes")
        return 1
    # the switch between the two sides of each pair
    switch = (backend.set_acceleration if reference else direct_conv.set_enabled if convolutions
              else kernels.set_enabled)
    if not reference:
        direct_conv.set_enabled(False)                # the loops' A/B: convolutions on BLAS both ways
    timed = (("Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "ConvTranspose2d") if reference
             else ("Conv2d",) if convolutions else ("BatchNorm2d", "ReLU"))
    acc: Dict[str, float] = collections.defaultdict(float)
    h = train_step.Harness(args, keep_freed_memory=True)
    for m in h.leaves():                              # time each call of those layers inside the steps
        kind = type(m).__name__
        if kind in timed:
            m.forward = train_step.timed_call(m.forward, acc, f"{kind} forward", h.sync)
            m.backward = train_step.timed_call(m.backward, acc, f"{kind} backward", h.sync)
    for loops in (False, True, False, True):          # warm-up: compile the loops, allocate, fill caches
        switch(loops)
        h.step()
    steps: Dict[bool, List[float]] = {False: [], True: []}
    layers: Dict[bool, Dict[str, List[float]]] = {False: collections.defaultdict(list),
                                                  True: collections.defaultdict(list)}
    for i in range(pairs):
        for loops in ((False, True) if i % 2 == 0 else (True, False)):
            switch(loops)
            acc.clear()
            start = time.perf_counter()
            h.step()
            h.sync()
            steps[loops].append(time.perf_counter() - start)
            for name, seconds in acc.items():
                layers[loops][name].append(seconds)
    kernels.set_enabled(True)
    direct_conv.set_enabled(True)
    backend.set_acceleration(True)
    ms = lambda values: statistics.median(values) * 1e3  # noqa: E731
    sides = ("reference layers / CPU acceleration" if reference else "BLAS products / direct kernels"
             if convolutions else "NumPy passes / compiled loops")
    print(f"== {train_step.describe(args)}: {pairs} pairs of steps, {sides} alternating")
    for name in sorted(layers[False]):
        print(f"  {name:22s} {ms(layers[False][name]):7.2f} ms  ->  {ms(layers[True][name]):7.2f} ms per step")
    totals = {loops: [sum(step) for step in zip(*layers[loops].values())] for loops in (False, True)}
    print(f"  {'all of them':22s} {ms(totals[False]):7.2f} ms  ->  {ms(totals[True]):7.2f} ms per step")
    print(f"  {'step (median)':22s} {ms(steps[False]):7.1f} ms  ->  {ms(steps[True]):7.1f} ms")
    ratios = [with_loops / without for without, with_loops in zip(steps[False], steps[True])]
    which = ("acceleration / reference" if reference else "direct kernels / BLAS" if convolutions
             else "loops / NumPy passes")
    print(f"  step pair ratio, {which}: median {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
