"""How many GPU kernels does a training step launch? Counted on CPU with the strict CuPy stand-in.

    python benchmarks/launches.py                      # the standard configuration: base 16, depth 4, batch 8, 128x128
    python benchmarks/launches.py --compare-torch      # + the operations PyTorch's profiler sees in its eager step

On a GPU a small model is bound by kernel launches (each costs ~5-10 us of CPU time and GPU idle),
not by arithmetic: the standard step is ~36 GFLOP, about a millisecond of a current GPU. This runs
one training step (forward, loss, backward, Adam; after one warm-up step) under tinyunet/fake_cupy.py,
which counts every array operation that would launch a kernel on CuPy (functions, ufuncs, operators,
computing methods, assignments into arrays; views and allocations from the pool launch nothing),
and prints them by layer type and by operation. A lower bound: CuPy runs some calls as several
kernels. ``--compare-torch`` counts the top-level operations of PyTorch's eager step for the same
architecture (torch.profiler, CPU: each would be at least one kernel on a GPU).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--arch", default="unet", choices=["unet", "resunet", "attunet"])
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--torch-python", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=["torch"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def count_tinyunet(args: argparse.Namespace) -> Dict[str, Any]:
    import numpy as np

    from tinyunet import fake_cupy
    from tinyunet import backend
    from tinyunet.losses import CrossEntropyLoss
    from tinyunet.models import create_model
    from tinyunet.optim import Adam

    backend.use_module(fake_cupy, "fake-cupy")
    backend.seed(0)
    model = create_model(args.arch, in_channels=3, num_classes=3, base_channels=args.base_channels,
                         depth=args.depth)
    optimizer, loss_fn = Adam(model.parameters()), CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.random((args.batch_size, 3, args.size, args.size), dtype=np.float32))
    y = backend.to_device(rng.integers(0, 3, (args.batch_size, args.size, args.size)))
    by_layer: Dict[str, int] = collections.Counter()

    def counted(kind: str, fn: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            before = fake_cupy.stats["launches"]
            out = fn(*a, **k)
            by_layer[kind] += fake_cupy.stats["launches"] - before
            return out
        return call

    def step() -> None:
        optimizer.zero_grad()
        loss = loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        optimizer.step()
        return loss

    step()                                               # warm-up (as on a GPU), then the counted step
    leaves = [m for _, m in model.named_modules() if not list(m.named_children())]
    for m in leaves:
        kind = type(m).__name__
        m.forward, m.backward = counted(kind, m.forward), counted(kind, m.backward)
    loss_fn.forward, loss_fn.backward = counted("loss", loss_fn.forward), counted("loss", loss_fn.backward)
    optimizer.zero_grad, optimizer.step = counted("optimizer", optimizer.zero_grad), counted("optimizer", optimizer.step)
    fake_cupy.reset_counters()
    loss = step()
    total = fake_cupy.stats["launches"]
    by_layer["other (the skip connections' gradient sums, ...)"] = total - sum(by_layer.values())
    float(loss)                                          # the one transfer of a step
    layers = collections.Counter(type(m).__name__ for m in leaves)
    return {"total": total, "by_layer": dict(by_layer), "by_operation": dict(fake_cupy.launches),
            "layers": dict(layers), "transfers": fake_cupy.stats["transfers"]}


def count_torch(args: argparse.Namespace) -> Dict[str, int]:
    """Top-level aten operations (not nested inside another aten call) of PyTorch's eager step: the
    forward, loss and backward; Adam's step as it runs on a CPU (a loop over the parameters); and
    Adam's step with ``foreach=True``, the multi-tensor form PyTorch uses by default on CUDA."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import train_step

    def top_level(fn: Any) -> int:
        fn()                                           # warm-up: optimizer state, first-call caches
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        return len([e for e in events if not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))])

    torch.manual_seed(0)
    model = train_step.torch_unet(args.base_channels, args.depth, 3)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.rand(args.batch_size, 3, args.size, args.size)
    y = torch.randint(0, 3, (args.batch_size, args.size, args.size))

    def forward_backward() -> None:
        model.zero_grad()
        loss_fn(model(x), y).backward()
    counts = {"forward_backward": top_level(forward_backward)}
    for name, foreach in (("adam_loop", False), ("adam_foreach", True)):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=foreach)
        counts[name] = top_level(optimizer.step)
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker == "torch":
        print(json.dumps(count_torch(args)))
        return 0
    ours = count_tinyunet(args)
    print(f"== {args.arch}, base {args.base_channels}, depth {args.depth}, batch {args.batch_size}, "
          f"{args.size}x{args.size}: array operations of one training step on the CuPy stand-in")
    print(f"  total {ours['total']} operations (each at least one kernel launch on a GPU); "
          f"{ours['transfers']} device -> host transfer (the loss)")
    print("  by layer type (count of layers):")
    for kind, n in sorted(ours["by_layer"].items(), key=lambda kv: -kv[1]):
        per = f", {n / ours['layers'][kind]:.0f} per layer" if kind in ours["layers"] else ""
        print(f"    {kind:52s} {n:5d}{per}" + (f" ({ours['layers'][kind]} layers)" if kind in ours["layers"] else ""))
    print("  most frequent operations: " + ", ".join(f"{k} {v}" for k, v in
                                                    sorted(ours["by_operation"].items(), key=lambda kv: -kv[1])[:12]))
    torch_ops = None
    if args.compare_torch:
        import train_step
        python = train_step.find_torch_python(args.torch_python)
        if python is None:
            print("  --compare-torch: torch is not importable here and no --torch-python was given; skipped")
        else:
            cmd = [python, os.path.abspath(__file__), "--worker", "torch", "--batch-size", str(args.batch_size),
                   "--size", str(args.size), "--base-channels", str(args.base_channels), "--depth", str(args.depth)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print("  --compare-torch: the torch worker failed:", proc.stderr.strip().splitlines()[-1:])
            else:
                torch_ops = json.loads(proc.stdout.strip().splitlines()[-1])
                fb, loop, foreach = torch_ops["forward_backward"], torch_ops["adam_loop"], torch_ops["adam_foreach"]
                print(f"  PyTorch eager, the same architecture, top-level aten operations: forward + loss + "
                      f"backward {fb}; Adam {loop} as a loop over the parameters (its CPU default), {foreach} with "
                      f"foreach=True (its CUDA default): a step of {fb + foreach} on a GPU, {fb + loop} on a CPU")
    if args.json:
        print(json.dumps({**ours, "torch_ops": torch_ops}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
