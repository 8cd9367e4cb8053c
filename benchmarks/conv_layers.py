"""Every 3x3 convolution of the U-Net, with every Conv2d implementation, against PyTorch: which is fastest where?

    python benchmarks/conv_layers.py                      # standard configuration: base 16, depth 4, batch 8, 128x128
    python benchmarks/conv_layers.py --compare-torch      # + torch.nn.Conv2d on the same shapes
    python benchmarks/conv_layers.py --batch-size 1

For each distinct (Cin, Cout, size) of the U-Net's padded 3x3 convolutions, forward + backward
(weight gradient, and the input gradient except for the RGB layer, as in training) is timed by the
reference layer (tinyunet/nn/conv.py, acceleration off) and by every accelerated implementation that
takes the shape (accel/choose.py's ``conv2d_candidates``: im2col, im2row, the shifted products,
Winograd, the direct kernels). "*" marks what the chooser picks. The figure is the minimum over
``--reps`` rounds, the implementations interleaved within each round (the machine's speed drifts over
seconds); GFLOP/s count the direct sum, 3 x 2 x N*H*W*Cin*Cout*9 per forward + backward. Inputs and
output gradients are channels-last in memory, as inside the U-Net, and glibc keeps freed memory for
reuse (``accel.allocator.keep_freed_host_memory``), as in training.

``--compare-torch`` times torch.nn.Conv2d (bias=False, the same shapes, float32, NCHW tensors as the
benchmark's PyTorch U-Net uses them, torch.set_num_threads(--threads)) in a separate process:
``--torch-python`` if given, else this interpreter if it imports torch, else /work/torchenv/bin/python
(``train_step.find_torch_python``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (same folder: how it finds an interpreter with torch)

Shape = Tuple[int, int, int]  # (Cin, Cout, size)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--reps", type=int, default=7, help="rounds; the minimum is reported")
    p.add_argument("--threads", type=int, default=None, help="tinyunet's threads and torch's (default: every core)")
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--torch-python", default=None)
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    p.add_argument("--worker", choices=["torch"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def unet_shapes(base: int, depth: int, size: int) -> List[Shape]:
    """The distinct (Cin, Cout, size) of the U-Net's 3x3 convolutions, in the order they run."""
    shapes: List[Shape] = []
    cin, s = 3, size
    for level in range(depth + 1):              # encoder levels and the bottleneck: two convs each
        cout = base * 2 ** level
        shapes += [(cin, cout, s), (cout, cout, s)]
        cin, s = cout, s // 2
    s *= 2                                      # the bottleneck's size
    for level in reversed(range(depth)):        # decoder: the concatenation doubles the input channels
        cout, s = base * 2 ** level, s * 2
        shapes += [(2 * cout, cout, s), (cout, cout, s)]
    return list(dict.fromkeys(shapes))


def direct_gflop(n: int, shape: Shape) -> float:
    cin, cout, s = shape
    return 3 * 2 * n * s * s * cin * cout * 9 / 1e9


IMPLEMENTATIONS = ("reference", "im2col", "im2row", "shifted", "winograd", "direct")


def time_tinyunet(args: argparse.Namespace, shapes: List[Shape]) -> Dict[Shape, Dict[str, Any]]:
    import numpy as np
    from tinyunet import backend
    from tinyunet.accel import parallel
    from tinyunet.accel.allocator import keep_freed_host_memory
    from tinyunet.accel.choose import choose, conv2d_candidates
    from tinyunet.nn import Conv2d

    backend.use("numpy")
    keep_freed_host_memory()
    if args.threads:
        parallel.set_num_threads(args.threads)

    def reference(layer: Any) -> Any:
        class Reference:   # the layer's own code, the acceleration off
            def forward(self, x: Any) -> Any:
                before = backend.set_acceleration(False)
                try:
                    return layer.forward(x)
                finally:
                    backend.set_acceleration(before)

            def backward(self, dout: Any) -> Any:
                return layer.backward(dout)
        return Reference()
    rng = np.random.default_rng(0)
    n = args.batch_size
    results: Dict[Shape, Dict[str, Any]] = {}
    for shape in shapes:
        cin, cout, s = shape
        # channels-last memory behind NCHW shapes, as the layers hand their outputs on
        x = rng.standard_normal((n, s, s, cin)).astype(np.float32).transpose(0, 3, 1, 2)
        dout = rng.standard_normal((n, s, s, cout)).astype(np.float32).transpose(0, 3, 1, 2)
        layer = Conv2d(cin, cout, 3, padding=1, bias=False)
        layer.input_grad = cin != 3  # the RGB layer skips the image's gradient, as in training
        runs = {"reference": reference(layer), **conv2d_candidates(layer, x)}
        best = {name: float("inf") for name in runs}
        for _ in range(args.reps):
            for name, implementation in runs.items():
                t = time.perf_counter()
                implementation.forward(x)
                implementation.backward(dout)
                best[name] = min(best[name], time.perf_counter() - t)
        results[shape] = {"ms": {m: v * 1e3 for m, v in best.items()}, "default": choose(layer, x).name}
    return results


def time_torch(args: argparse.Namespace, shapes: List[Shape]) -> Dict[Shape, float]:
    import torch
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    n = args.batch_size
    out: Dict[Shape, float] = {}
    for shape in shapes:
        cin, cout, s = shape
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        x = torch.randn(n, cin, s, s, requires_grad=cin != 3)
        g = torch.randn(n, cout, s, s)
        for _ in range(2):  # warm-up: oneDNN picks and compiles its kernels on the first calls
            conv(x).backward(g)
        best = float("inf")
        for _ in range(args.reps):
            t = time.perf_counter()
            conv(x).backward(g)
            best = min(best, time.perf_counter() - t)
        out[shape] = best * 1e3
    return out


def run_torch(args: argparse.Namespace) -> Optional[Dict[Shape, float]]:
    python = train_step.find_torch_python(args.torch_python)
    if python is None:
        print("--compare-torch: torch is not importable here and no --torch-python was given; skipped")
        return None
    cmd = [python, os.path.abspath(__file__), "--worker", "torch", "--batch-size", str(args.batch_size),
           "--size", str(args.size), "--base-channels", str(args.base_channels), "--depth", str(args.depth),
           "--reps", str(args.reps)] + (["--threads", str(args.threads)] if args.threads else [])
    # glibc keeps freed memory for PyTorch too: by default each step's ~8 MB outputs and gradients
    # would be fresh mmaps, page-faulted in on every call (tinyunet's side keeps its freed memory)
    env = dict(os.environ, **train_step.KEEP_FREED_MEMORY)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"--compare-torch: the torch worker failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return {tuple(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    shapes = unet_shapes(args.base_channels, args.depth, args.size)
    if args.worker == "torch":
        print(json.dumps([[list(k), v] for k, v in time_torch(args, shapes).items()]))
        return 0
    ours = time_tinyunet(args, shapes)
    theirs = run_torch(args) if args.compare_torch else None
    n = args.batch_size
    print(f"U-Net base {args.base_channels}, depth {args.depth}, batch {n}, {args.size}x{args.size}: every 3x3 "
          f"convolution, forward + backward, min of {args.reps} rounds, ms (GFLOP/s of the direct sum); * = default")
    header = f"{'Cin->Cout @ size':<20}" + "".join(f"{m:>17}" for m in IMPLEMENTATIONS)
    print(header + (f"{'PyTorch':>17}" if theirs else ""))
    for shape in shapes:
        cin, cout, s = shape
        gflop = direct_gflop(n, shape)
        cells = []
        for method in IMPLEMENTATIONS:
            ms = ours[shape]["ms"].get(method)
            mark = "*" if method == ours[shape]["default"] else " "
            cells.append(f"{'-':>17}" if ms is None else f"{ms:8.2f} ({gflop / ms * 1e3:4.0f}){mark}")
        if theirs:
            cells.append(f"{theirs[shape]:8.2f} ({gflop / theirs[shape] * 1e3:4.0f}) ")
        print(f"{f'{cin}->{cout} @ {s}x{s}':<20}" + "".join(cells))
    total_default = sum(r["ms"][r["default"]] for r in ours.values())
    total_best = sum(min(r["ms"].values()) for r in ours.values())
    total_reference = sum(r["ms"]["reference"] for r in ours.values())
    line = (f"sum over these shapes: the chooser's picks {total_default:.1f} ms, the fastest per shape "
            f"{total_best:.1f} ms, the reference {total_reference:.1f} ms")
    print(line + (f", PyTorch {sum(theirs.values()):.1f} ms" if theirs else ""))
    if args.json:
        print(json.dumps({"batch_size": n, "layers": [
            {"shape": list(k), "default": v["default"], "ms": v["ms"], "torch_ms": theirs.get(k) if theirs else None}
            for k, v in ours.items()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
