"""How fast is one U-Net training step, where does the time go, and how much memory does it take?

    python benchmarks/train_step.py                       # the standard configuration
    python benchmarks/train_step.py --compare-torch       # + the same network in PyTorch, same run
    python benchmarks/train_step.py --report              # standard, batch 1 and base 32 in a row
    python benchmarks/train_step.py --batch-size 1 --threads 1

Standard configuration: UNet(base_channels=16, depth=4, batchnorm=True), 3 -> 3 classes, 128x128,
batch 8, Adam(lr=1e-3), CrossEntropyLoss, float32, NumPy backend.

What is printed, and the conventions behind each number:

- ms/step: median (and min) over ``--steps`` steps after ``--warmup`` steps. One step is
  zero_grad + forward + loss + backward + optimizer step, exactly what ``tinyunet train`` runs.
- effective GFLOP/s: FLOPs are counted analytically from the shapes the layers saw: 2 * MACs of every
  Conv2d (N*Cout*Hout*Wout*Cin*kh*kw MACs) and ConvTranspose2d (N*Cin*H*W*Cout*kh*kw MACs); batch
  norm, ReLU, pooling, loss and optimizer are not counted (they are < 1% of the FLOPs). A training
  step counts as 3x the forward FLOPs (backward = one product for d(input) + one for d(weight)).
  Divided by the median step time. The same count is used for PyTorch.
- machine GFLOP/s: float32 2048x2048 matrix product (NumPy's BLAS), best of 5, measured in this run
  on as many BLAS threads as tinyunet has threads (at the start and after each configuration; the
  best so far is used, since other processes only ever make it lower); "ratio" is effective / machine.
- threads: tinyunet splits big layers into row blocks on its own thread pool and runs BLAS with one
  thread per call (tinyunet/accel/parallel.py); PyTorch uses torch.set_num_threads(the same number).
- breakdown: forward and backward time of each layer type, summed over its instances, measured by
  wrapping each layer's forward/backward in this script (the package has no timing code), over
  separate steps after the clean timing; "other" is the rest of the step (the U-Net's skip-gradient
  additions and Python glue). With ``--compare-torch`` PyTorch's layers are timed the same way
  (module hooks, see ``torch_breakdown``) and printed beside ours; ``--per-conv`` also lists every
  convolution of the network, in the order the forward pass runs them.
- peak memory: (a) tracemalloc: the peak of traced allocations during one step above the level just
  before it (NumPy reports its array buffers to tracemalloc), NumPy only; (b) peak RSS: the process's
  resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs where the kernel allows) during
  2 steps minus the RSS just before them (after one warm-up step, so optimizer state and caches are
  already there), each framework in its own fresh process with glibc's mmap threshold fixed at
  128 KiB so freed arrays leave the RSS - the only measure that sees PyTorch's allocations too.
- allocator: step times are measured the way ``tinyunet train`` runs, with glibc told to keep freed
  memory for reuse (``accel.allocator.keep_freed_host_memory``, see its docstring: it saves the page faults
  of re-mapping ~100 MB per step); the PyTorch timing process gets the same setting through
  ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``. ``--default-malloc`` times both with
  glibc's defaults instead.

``--compare-torch`` builds the same architecture in PyTorch (Conv2d bias=False before BatchNorm,
ConvTranspose2d 2x2 stride 2 with bias, cat([up, skip]), 1x1 head), float32, Adam, torch.set_num_threads
(--threads, default: every usable core), and runs it in a separate process: this interpreter if it can import torch,
else ``--torch-python`` (default /work/torchenv/bin/python if it exists). torch is never a dependency
of tinyunet.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

DEFAULT_TORCH_PYTHON = "/work/torchenv/bin/python"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="image height and width")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--arch", default="unet", choices=["unet", "resunet", "attunet"],
                   help="architecture (--compare-torch builds the plain U-Net only)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--breakdown-steps", type=int, default=3, help="steps timed with per-layer wrappers (0: skip)")
    p.add_argument("--per-conv", action="store_true",
                   help="with the breakdown, also print each convolution's forward and backward")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for tinyunet's row blocks (parallel.set_num_threads), for the reference "
                        "matrix product's BLAS and for torch.set_num_threads; default: every usable core")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-accel", action="store_true",
                   help="the reference layers alone (tinyunet/nn, as TINYUNET_ACCEL=0): the lessons' code")
    p.add_argument("--numpy-only", action="store_true",
                   help="BatchNorm and ReLU on their NumPy passes and the shifted convolutions on BLAS, even where "
                        "Numba is installed (tinyunet/accel/compiled_loops.py, direct_kernels.py)")
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--default-malloc", action="store_true",
                   help="time with glibc's default allocator settings (freed memory returned to the OS)")
    p.add_argument("--torch-python", default=None, help="interpreter with torch for --compare-torch")
    p.add_argument("--report", action="store_true", help="run standard, batch 1 and base 32 in a row")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every configuration this many times (tinyunet, then PyTorch, each round) "
                        "and print each round's medians and the median ratio")
    p.add_argument("--worker", choices=["numpy-memory", "torch", "torch-memory"], default=None,
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def set_threads(threads: Optional[int]) -> None:
    """Must run before NumPy is imported: BLAS reads these once, when it loads."""
    if threads is not None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)


# --- memory helpers (Linux /proc; None elsewhere) ------------------------------------------------
def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_rss(step, steps: int = 2) -> Dict[str, Any]:
    """Peak RSS during ``steps`` calls of step() minus the RSS just before them, in MB."""
    import gc
    gc.collect()
    reset_ok = reset_peak_rss()
    before = _status_kb("VmRSS")
    for _ in range(steps):
        step()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return {"rss_peak_delta_mb": None, "rss_hwm_reset": reset_ok}
    return {"rss_peak_delta_mb": (peak - before) / 1024, "rss_before_mb": before / 1024,
            "rss_hwm_reset": reset_ok}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gemm_gflops(np_module: Any, threads: int, n: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matrix-product speed on ``threads`` BLAS threads (tinyunet limits BLAS
    to one thread per call once its thread pool starts: lift that here)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=threads, user_api="blas"):
        return _gemm_gflops(np_module, n, repeats)


def blas_kernels() -> str:
    """Which kernels NumPy's BLAS runs, as threadpoolctl reports them, and who chose them: OpenBLAS
    picks by CPU model unless OPENBLAS_CORETYPE says otherwise (the environment of the machines in the
    README sets it to Haswell, AVX2 kernels; OpenBLAS's own choice there is SkylakeX, AVX-512)."""
    from threadpoolctl import threadpool_info
    import numpy  # noqa: F401  (loads the BLAS)
    info = next((i for i in threadpool_info() if i["user_api"] == "blas"), None)
    if info is None:
        return "BLAS unknown"
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return (f"NumPy's BLAS: {info['internal_api']} {info.get('version') or ''}, "
            f"{info.get('architecture') or '?'} kernels"
            + (f" (OPENBLAS_CORETYPE={forced} in the environment)" if forced and info["internal_api"] == "openblas" else ""))


def _gemm_gflops(np_module: Any, n: int, repeats: int) -> float:
    a = np_module.ones((n, n), dtype=np_module.float32)
    b = np_module.ones((n, n), dtype=np_module.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


# --- tinyunet ------------------------------------------------------------------------------------
class Harness:
    """A model, data, loss and optimizer for one configuration, and a ``step()`` closure."""

    def __init__(self, args: argparse.Namespace, keep_freed_memory: bool = False) -> None:
        import numpy as np
        from tinyunet import backend
        from tinyunet.accel import parallel
        from tinyunet.accel.allocator import keep_freed_host_memory
        if keep_freed_memory:
            keep_freed_host_memory()
        if args.threads:
            parallel.set_num_threads(args.threads)
        from tinyunet.losses import CrossEntropyLoss
        from tinyunet.models import create_model
        from tinyunet.optim import Adam

        backend.use(args.backend)
        backend.seed(0)
        self.xp = backend.xp
        self.model = create_model(args.arch, in_channels=3, num_classes=args.classes,
                                  base_channels=args.base_channels, depth=args.depth, batchnorm=True)
        self.loss = CrossEntropyLoss()
        self.opt = Adam(self.model.parameters(), lr=1e-3)
        rng = np.random.default_rng(0)
        n, s = args.batch_size, args.size
        self.x = backend.to_device(rng.standard_normal((n, 3, s, s)).astype(np.float32))
        self.y = backend.to_device(rng.integers(0, args.classes, (n, s, s)))
        self.backend = args.backend

    def sync(self) -> None:
        if self.backend == "cupy":
            self.xp.cuda.Device().synchronize()

    def step(self) -> Any:
        self.opt.zero_grad()
        logits = self.model(self.x)
        value = self.loss.forward(logits, self.y)
        self.model.backward(self.loss.backward(), input_grad=False)  # as tinyunet train: no image gradient
        self.opt.step()
        return value

    def leaves(self) -> List[Any]:
        return [m for m in self.model.modules() if not list(m.named_children())]


def conv_flops(kind: str, module: Any, in_shape, out_shape) -> int:
    """Forward FLOPs (2 * MACs) of one call of a Conv2d / ConvTranspose2d."""
    kh, kw = module.kernel_size
    if kind == "Conv2d":
        n, _, ho, wo = out_shape
        return 2 * n * module.out_channels * ho * wo * module.in_channels * kh * kw
    n, _, h, w = in_shape
    return 2 * n * module.in_channels * h * w * module.out_channels * kh * kw


TYPES = ["Conv2d", "ConvTranspose2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Concat"]


def forward_flops(h: Harness) -> int:
    """Run one forward with shape-recording wrappers and add up the conv FLOPs."""
    total = 0
    originals = []
    for m in h.leaves():
        kind = type(m).__name__
        if kind not in ("Conv2d", "ConvTranspose2d"):
            continue
        f = m.forward

        def rec(*a, _f=f, _m=m, _k=kind):
            nonlocal total
            out = _f(*a)
            total += conv_flops(_k, _m, a[0].shape, out.shape)
            return out
        m.forward = rec
        originals.append(m)
    h.model(h.x)
    for m in originals:
        del m.forward  # back to the class method
    return total


def timed_call(fn: Callable[..., Any], times: Dict[Any, float], key: Any,
               sync: Callable[[], None]) -> Callable[..., Any]:
    """fn, adding the seconds of each call to times[key] (synchronised before and after: on a GPU the
    work is queued, not done, when fn returns)."""
    def wrapper(*a: Any) -> Any:
        sync()
        t = time.perf_counter()
        out = fn(*a)
        sync()
        times[key] += time.perf_counter() - t
        return out
    return wrapper


def breakdown(h: Harness, steps: int) -> Dict[str, float]:
    """Seconds per step spent in each layer type's forward and backward, loss and optimizer."""
    from collections import defaultdict
    times: Dict[str, float] = defaultdict(float)

    def timed(fn, key):
        return timed_call(fn, times, key, h.sync)

    wrapped = []
    for m in h.leaves():
        kind = type(m).__name__
        m.forward, m.backward = timed(m.forward, (kind, "fwd")), timed(m.backward, (kind, "bwd"))
        if kind == "Conv2d":  # each convolution on its own too, named by the order its forward runs
            m.forward, m.backward = timed(m.forward, (m, "fwd")), timed(m.backward, (m, "bwd"))
        wrapped.append(m)
    loss, opt = h.loss, h.opt
    loss.forward, loss.backward = timed(loss.forward, ("loss", "fwd")), timed(loss.backward, ("loss", "bwd"))
    opt.step, opt.zero_grad = timed(opt.step, ("optimizer", "step")), timed(opt.zero_grad, ("optimizer", "zero_grad"))
    h.step()  # warm the wrappers
    times.clear()
    t = time.perf_counter()
    for _ in range(steps):
        h.step()
    h.sync()
    total = time.perf_counter() - t
    for m in wrapped:
        del m.forward, m.backward
    del loss.forward, loss.backward, opt.step, opt.zero_grad
    return per_step(times, steps, total)


def per_step(times: Dict[Any, float], steps: int, total: float) -> Dict[str, float]:
    """Seconds per step under "Kind.fwd"/"Kind.bwd" names, and each convolution (times keyed by the
    module itself; dicts keep the order of first use, the forward order) as "conv k: Cin->Cout"."""
    out: Dict[str, float] = {"total": total / steps}
    convs = [m for m, _ in times if not isinstance(m, str)]
    names = {m: f"conv {k:2d}: {m.in_channels}->{m.out_channels}" for k, m in enumerate(dict.fromkeys(convs))}
    for (key, direction), seconds in times.items():
        out[f"{names.get(key, key)}.{direction}"] = seconds / steps
    return out


def time_steps(step, sync, warmup: int, steps: int) -> List[float]:
    for _ in range(warmup):
        step()
    sync()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t)
    return ts


def run_worker(args: argparse.Namespace) -> Dict[str, Any]:
    """Fresh-process measurements (printed as JSON for the parent)."""
    if args.worker == "numpy-memory":
        h = Harness(args)
        h.step()  # allocate optimizer state, first-call caches
        return measure_rss(h.step)
    return torch_worker(args, memory=args.worker == "torch-memory")


def run_numpy(args: argparse.Namespace) -> Dict[str, Any]:
    import statistics
    import numpy as np
    h = Harness(args, keep_freed_memory=not args.default_malloc)
    from tinyunet import backend
    from tinyunet.accel import compiled_loops
    res: Dict[str, Any] = {"framework": "tinyunet/" + args.backend, "numpy": np.__version__,
                           "loops": loops_description(compiled_loops.available(), backend.accelerate())}
    fwd = forward_flops(h)
    res["forward_gflop"] = fwd / 1e9
    res["train_gflop"] = 3 * fwd / 1e9
    ts = time_steps(h.step, h.sync, args.warmup, args.steps)
    res["ms_median"] = statistics.median(ts) * 1e3
    res["ms_min"] = min(ts) * 1e3
    from threadpoolctl import threadpool_info
    from tinyunet.accel import parallel
    res["threads"] = parallel.get_num_threads()
    res["blas_threads"] = max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=None)
    res["steps"] = len(ts)
    if args.breakdown_steps:
        res["breakdown_ms"] = {k: v * 1e3 for k, v in breakdown(h, args.breakdown_steps).items()}
    if not args.no_memory:
        import tracemalloc
        import gc
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        h.step()
        res["tracemalloc_peak_mb"] = (tracemalloc.get_traced_memory()[1] - base) / 2 ** 20
        tracemalloc.stop()
        del h
        res.update(spawn(args, "numpy-memory", sys.executable) or {})
    return res


# --- PyTorch ---------------------------------------------------------------------------------------
def torch_worker(args: argparse.Namespace, memory: bool) -> Dict[str, Any]:
    """Step times (memory=False) or the peak-RSS measurement (memory=True) of the PyTorch U-Net."""
    import statistics
    import torch
    from torch import nn

    torch.set_num_threads(args.threads or usable_cores())
    torch.manual_seed(0)

    model = torch_unet(args.base_channels, args.depth, args.classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.size, args.size, generator=g)
    y = torch.randint(0, args.classes, (args.batch_size, args.size, args.size), generator=g)

    def step():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    if memory:
        step()  # allocate optimizer state, first-call caches
        return measure_rss(step)
    ts = time_steps(step, lambda: None, args.warmup, args.steps)
    res = {"framework": "torch " + torch.__version__, "threads": torch.get_num_threads(),
           "ms_median": statistics.median(ts) * 1e3, "ms_min": min(ts) * 1e3,
           "params": sum(p.numel() for p in model.parameters())}
    if args.breakdown_steps:
        res["breakdown_ms"] = {k: v * 1e3 for k, v in torch_breakdown(model, loss_fn, opt, x, y,
                                                                      args.breakdown_steps).items()}
    return res


def torch_unet(base: int, depth: int, classes: int) -> Any:
    """The PyTorch U-Net of the comparisons: layer for layer tinyunet's UNet."""
    import torch
    from torch import nn

    def double_conv(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class TorchUNet(nn.Module):
        """Layer for layer the tinyunet UNet (padded 3x3 convs, BN, 2x2 up-conv, cat(up, skip))."""

        def __init__(self, base: int, depth: int, classes: int) -> None:
            super().__init__()
            widths = [base * 2 ** level for level in range(depth + 1)]
            self.down = nn.ModuleList(double_conv(ci, co) for ci, co in zip([3] + widths[:depth - 1], widths[:depth]))
            self.pool = nn.MaxPool2d(2)
            self.bottleneck = double_conv(widths[depth - 1], widths[depth])
            self.up = nn.ModuleList(nn.ConvTranspose2d(widths[l + 1], widths[l], 2, stride=2) for l in reversed(range(depth)))
            self.up_conv = nn.ModuleList(double_conv(2 * widths[l], widths[l]) for l in reversed(range(depth)))
            self.head = nn.Conv2d(widths[0], classes, 1)

        def forward(self, x):
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottleneck(x)
            for up, block, skip in zip(self.up, self.up_conv, reversed(skips)):
                x = block(torch.cat([up(x), skip], dim=1))
            return self.head(x)

    return TorchUNet(base, depth, classes)


def torch_breakdown(model: Any, loss_fn: Any, opt: Any, x: Any, y: Any, steps: int) -> Dict[str, float]:
    """Seconds per step in each layer type's forward and backward, as ``breakdown`` for tinyunet.

    Module hooks mark where each layer's forward starts and ends, and where autograd starts and
    ends its backward (full backward pre-hook and hook; CPU autograd runs the nodes one after
    another on this thread, each using the intra-op threads). torch.cat is no module: it lands in
    "other", with the autograd engine's own work. The first convolution's input needs no gradient,
    so no hook marks the end of its backward: it is the last node of the backward pass, and its
    time runs to the end of ``loss.backward()``."""
    import torch
    from collections import defaultdict
    times: Dict[Any, float] = defaultdict(float)
    started: Dict[Any, float] = {}
    handles = []

    def start(key: Any) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            started[key] = time.perf_counter()
        return hook

    def end(key: Any, name: Any, keep: bool = False) -> Callable[..., None]:
        def hook(*_: Any) -> None:  # keep: a later hook of the same module pops the start
            began = started[key] if keep else started.pop(key)
            times[name] += time.perf_counter() - began
        return hook

    def end_backward(key: Any, name: Any, keep: bool = False) -> Callable[..., None]:
        def hook(module: Any, grad_input: Any, grad_output: Any) -> None:
            if any(g is not None for g in grad_input):  # else: counted at the end of loss.backward()
                end(key, name, keep)()
        return hook

    kinds = {torch.nn.Conv2d: "Conv2d", torch.nn.ConvTranspose2d: "ConvTranspose2d",
             torch.nn.BatchNorm2d: "BatchNorm2d", torch.nn.ReLU: "ReLU", torch.nn.MaxPool2d: "MaxPool2d",
             torch.nn.CrossEntropyLoss: "loss"}
    for m in list(model.modules()) + [loss_fn]:
        kind = kinds.get(type(m))
        if kind is None:
            continue
        handles += [m.register_forward_pre_hook(start((m, "fwd"))), m.register_full_backward_pre_hook(start((m, "bwd")))]
        if type(m) is torch.nn.Conv2d:  # each convolution on its own too, as for tinyunet (hooks run in order)
            handles += [m.register_forward_hook(end((m, "fwd"), (m, "fwd"), keep=True)),
                        m.register_full_backward_hook(end_backward((m, "bwd"), (m, "bwd"), keep=True))]
        handles += [m.register_forward_hook(end((m, "fwd"), (kind, "fwd"))),
                    m.register_full_backward_hook(end_backward((m, "bwd"), (kind, "bwd")))]

    def step() -> None:
        t = time.perf_counter()
        opt.zero_grad()
        times["optimizer", "zero_grad"] += time.perf_counter() - t
        loss = loss_fn(model(x), y)
        loss.backward()
        done = time.perf_counter()
        for (module, _), began in list(started.items()):  # backward passes no hook has ended
            times[kinds[type(module)], "bwd"] += done - began
            if type(module) is torch.nn.Conv2d:
                times[module, "bwd"] += done - began
        started.clear()
        t = time.perf_counter()
        opt.step()
        times["optimizer", "step"] += time.perf_counter() - t

    step()  # warm the hooks
    times.clear()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    total = time.perf_counter() - t
    for h in handles:
        h.remove()
    return per_step(times, steps, total)


def torch_importable() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("torch") is not None
    except Exception:
        return False


# glibc's malloc settings for the worker processes (environment variables read at start-up)
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2 ** 31 - 1)}
# for RSS measurements: glibc would otherwise keep freed big blocks in its heap (its mmap threshold
# grows up to 32 MB after frees), so RSS would lag behind what is really live; a fixed threshold maps
# and unmaps every block >= 128 KiB, the same for both frameworks
RETURN_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def spawn(args: argparse.Namespace, worker: str, python: str) -> Optional[Dict[str, Any]]:
    """Run this script as a worker in a fresh process; return its JSON result (None on failure)."""
    cmd = [python, os.path.abspath(__file__), "--worker", worker,
           "--batch-size", str(args.batch_size), "--size", str(args.size),
           "--base-channels", str(args.base_channels), "--depth", str(args.depth),
           "--classes", str(args.classes), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--breakdown-steps", str(args.breakdown_steps), "--backend", args.backend]
    if args.per_conv:
        cmd += ["--per-conv"]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.no_memory:
        cmd += ["--no-memory"]
    if worker.endswith("memory"):
        env = dict(os.environ, **RETURN_FREED_MEMORY)
    elif args.default_malloc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    else:
        env = dict(os.environ, **KEEP_FREED_MEMORY)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  ({worker} worker failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def find_torch_python(requested: Optional[str]) -> Optional[str]:
    """The interpreter for PyTorch workers: ``requested`` if given, else this one if it imports torch,
    else DEFAULT_TORCH_PYTHON if it exists, else None."""
    if requested is not None:
        return requested
    if torch_importable():
        return sys.executable
    return DEFAULT_TORCH_PYTHON if os.path.exists(DEFAULT_TORCH_PYTHON) else None


def run_torch(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    python = find_torch_python(args.torch_python)
    if python is None:
        print("  --compare-torch: torch is not importable here and no --torch-python was given; skipped")
        return None
    res = spawn(args, "torch", python)
    if res is not None and not args.no_memory:
        res.update(spawn(args, "torch-memory", python) or {})
    return res


# --- report ---------------------------------------------------------------------------------------
def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def loops_description(compiled: bool, accelerated: bool = True) -> str:
    """How the layers run: the reference alone, or the acceleration with or without Numba's code
    (tinyunet/accel/compiled_loops.py, direct_kernels.py)."""
    if not accelerated:
        return "the reference layers alone (tinyunet/nn, --no-accel)"
    if not compiled:
        return "BatchNorm/ReLU as NumPy passes, convolutions on BLAS"
    import numba
    return f"BatchNorm/ReLU as Numba {numba.__version__} loops, shifted convolutions as its direct kernels"


def describe(args: argparse.Namespace) -> str:
    name = {"unet": "UNet", "resunet": "ResUNet", "attunet": "AttentionUNet"}[args.arch]
    return (f"{name}(base_channels={args.base_channels}, depth={args.depth}, batchnorm=True), "
            f"{args.size}x{args.size}, batch {args.batch_size}, Adam, CrossEntropyLoss, float32")


def print_result(args: argparse.Namespace, res: Dict[str, Any], machine: float,
                 torch_res: Optional[Dict[str, Any]]) -> None:
    ms = res["ms_median"]
    eff = res["train_gflop"] / (ms / 1e3)
    print(f"\n== {describe(args)}")
    print(f"tinyunet ({res['framework']}, numpy {res['numpy']}, {res['threads']} threads for row blocks, "
          f"BLAS {res['blas_threads']} thread(s) per call, {res['loops']}), "
          f"{res['steps']} steps after {args.warmup} warm-up, "
          f"{'glibc malloc defaults' if args.default_malloc else 'freed memory kept for reuse'}:")
    print(f"  step time         {ms:8.1f} ms median   ({res['ms_min']:.1f} min)")
    print(f"  throughput        {args.batch_size / (ms / 1e3):8.2f} images/s")
    print(f"  conv FLOPs        {res['forward_gflop']:8.2f} GFLOP forward, x3 = {res['train_gflop']:.2f} GFLOP per training step")
    print(f"  effective         {eff:8.1f} GFLOP/s   = {100 * eff / machine:.0f}% of this machine's "
          f"{machine:.1f} GFLOP/s (float32 2048^3 matmul)")
    if "breakdown_ms" in res:
        print_breakdown(args, res["breakdown_ms"], (torch_res or {}).get("breakdown_ms"))
    if "tracemalloc_peak_mb" in res:
        print(f"  peak memory       {res['tracemalloc_peak_mb']:8.1f} MB tracemalloc peak during one step (NumPy buffers)")
    if res.get("rss_peak_delta_mb") is not None:
        print(f"                    {res['rss_peak_delta_mb']:8.1f} MB peak RSS over 2 steps minus RSS before "
              f"(fresh process{'' if res.get('rss_hwm_reset') else ', VmHWM not resettable'})")
    if torch_res:
        t_ms = torch_res["ms_median"]
        print(f"{torch_res['framework']} ({torch_res['threads']} threads), same architecture, same run:")
        print(f"  step time         {t_ms:8.1f} ms median   ({torch_res['ms_min']:.1f} min), "
              f"{res['train_gflop'] / (t_ms / 1e3):.1f} GFLOP/s")
        print(f"  tinyunet / torch  {ms / t_ms:8.2f}x time")
        if torch_res.get("rss_peak_delta_mb") is not None and res.get("rss_peak_delta_mb") is not None:
            print(f"  peak RSS delta    {torch_res['rss_peak_delta_mb']:8.1f} MB torch vs "
                  f"{res['rss_peak_delta_mb']:.1f} MB tinyunet ({res['rss_peak_delta_mb'] / max(torch_res['rss_peak_delta_mb'], 1e-9):.2f}x)")


def breakdown_rows(b: Dict[str, float]) -> List[Any]:
    """(name, forward ms, backward ms) per layer type, loss, optimizer, and "other" (the rest of the step)."""
    rows = [(t, b.get(f"{t}.fwd", 0.0), b.get(f"{t}.bwd", 0.0)) for t in TYPES]
    rows += [("loss", b.get("loss.fwd", 0.0), b.get("loss.bwd", 0.0)),
             ("optimizer", b.get("optimizer.zero_grad", 0.0), b.get("optimizer.step", 0.0))]
    return rows + [("other", 0.0, b["total"] - sum(f + bw for _, f, bw in rows))]


def conv_rows(b: Dict[str, float]) -> List[Any]:
    """(name, forward ms, backward ms) of each convolution, in forward order."""
    names = [k[:-4] for k in b if k.startswith("conv ") and k.endswith(".fwd")]
    return [(name, b[name + ".fwd"], b.get(name + ".bwd", 0.0)) for name in names]


def print_breakdown(args: argparse.Namespace, ours: Dict[str, float], theirs: Optional[Dict[str, float]]) -> None:
    """The per-layer table; with PyTorch's breakdown from the same run beside it."""
    head = f"  breakdown over {args.breakdown_steps} wrapped steps ({ours['total']:.1f} ms/step with wrappers"
    print(head + (f"; PyTorch {theirs['total']:.1f} ms/step with hooks):" if theirs else "):"))
    cols = f"{'forward':>9s} {'backward':>9s} {'total':>9s} {'share':>6s}"
    print(f"    {'':18s} {cols}" + (f"   | PyTorch {cols}   tinyunet/PyTorch" if theirs else ""))

    def cells(name: str, fwd: float, bwd: float, total: float) -> str:  # "other" is one number, no fwd/bwd split
        parts = f"{'':9s} {'':9s}" if name == "other" else f"{fwd:8.1f}  {bwd:8.1f} "
        return f"{parts} {fwd + bwd:8.1f}  {100 * (fwd + bwd) / total:5.1f}%"

    def print_rows(rows: List[Any], their_rows: Optional[List[Any]]) -> None:
        for k, (name, f, bw) in enumerate(rows):
            line = f"    {name:18s} {cells(name, f, bw, ours['total'])}"
            if their_rows and k < len(their_rows):
                _, tf, tb = their_rows[k]
                ratio = f"{(f + bw) / (tf + tb):8.2f}x" if tf + tb > 0.05 else f"{'-':>9s}"
                line += f"   |         {cells(name, tf, tb, theirs['total'])}   {ratio}"
            print(line)
    print_rows(breakdown_rows(ours), breakdown_rows(theirs) if theirs else None)
    print("    (optimizer: 'forward' column = zero_grad, 'backward' column = step; other: skip-gradient adds, "
          "Python glue" + ("; PyTorch's torch.cat is no module: in its other" if theirs else "") + ")")
    if args.per_conv:
        print("  each convolution, in the order of the forward pass (Cin->Cout):")
        print_rows(conv_rows(ours), conv_rows(theirs) if theirs else None)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.numpy_only:
        os.environ["TINYUNET_KERNELS"] = "numpy"   # for the worker processes too
        from tinyunet.accel import compiled_loops
        compiled_loops.set_enabled(False)
    if args.no_accel:
        os.environ["TINYUNET_ACCEL"] = "0"          # for the worker processes too
        from tinyunet import backend
        backend.set_acceleration(False)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    import numpy as np
    configs = [args]
    if args.report:
        configs = []
        for bs, base in [(args.batch_size, args.base_channels), (1, args.base_channels), (args.batch_size, 32)]:
            c = argparse.Namespace(**vars(args))
            c.batch_size, c.base_channels = bs, base
            configs.append(c)
    print(f"load average {load_average()} (other processes on this machine skew the timings); "
          f"{os.cpu_count()} CPUs; {blas_kernels()}")
    threads = args.threads or usable_cores()
    machine = gemm_gflops(np, threads)
    rounds: List[List[Any]] = []
    for c in configs:
        res = run_numpy(c)
        torch_res = run_torch(c) if c.compare_torch and c.arch == "unet" else None
        # other processes make any single GEMM measurement low: keep the best one seen in this run
        machine = max(machine, gemm_gflops(np, threads))
        print_result(c, res, machine, torch_res)
        rounds.append([round_result(res, torch_res)])
        if args.json:
            print(json.dumps({"config": {k: getattr(c, k) for k in ("batch_size", "size", "base_channels", "depth")},
                              "machine_gflops": machine, "tinyunet": res, "torch": torch_res}))
    if args.rounds > 1:
        repeat_rounds(args, configs, rounds, machine)
    print(f"\nload average {load_average()} at the end")
    return 0


def round_result(res: Dict[str, Any], torch_res: Optional[Dict[str, Any]]) -> Tuple[float, Optional[float], Any, Any]:
    """What a round keeps: both step times and both breakdowns (None where not measured)."""
    return (res["ms_median"], torch_res["ms_median"] if torch_res else None,
            res.get("breakdown_ms"), (torch_res or {}).get("breakdown_ms"))


def median_breakdown(breakdowns: List[Optional[Dict[str, float]]]) -> Optional[Dict[str, float]]:
    """Per name, the median over the rounds that measured it."""
    import statistics
    measured = [b for b in breakdowns if b]
    return {k: statistics.median(b[k] for b in measured if k in b) for k in measured[0]} if measured else None


def repeat_rounds(args: argparse.Namespace, configs: List[argparse.Namespace], rounds: List[List[Any]],
                  machine: float) -> None:
    """Time each configuration again, tinyunet and PyTorch one after the other, and summarise.

    This machine's speed drifts over minutes (other tenants): a single run can be 10-20% off for
    both frameworks. Repeating the pair and reading the median of the per-round ratios is steadier
    than one run's ratio. The breakdowns are measured again each round too (a few steps each) and
    printed as medians over the rounds."""
    import statistics
    for _ in range(args.rounds - 1):
        for c, per_round in zip(configs, rounds):
            quick = argparse.Namespace(**vars(c))
            quick.no_memory = True
            res = run_numpy(quick)
            torch_res = run_torch(quick) if c.compare_torch and c.arch == "unet" else None
            per_round.append(round_result(res, torch_res))
    print(f"\n== {args.rounds} rounds (median step of each round; machine {machine:.1f} GFLOP/s, the best seen)")
    for c, per_round in zip(configs, rounds):
        ours = [r[0] for r in per_round]
        line = (f"  batch {c.batch_size}, base {c.base_channels}: tinyunet "
                + " ".join(f"{ms:.0f}" for ms in ours) + f" ms (median {statistics.median(ours):.0f})")
        ratios = [ms / t for ms, t, _, _ in per_round if t]
        if ratios:
            line += ("; PyTorch " + " ".join(f"{r[1]:.0f}" for r in per_round) + " ms; ratio median "
                     f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")
        print(line)
    for c, per_round in zip(configs, rounds):
        ours_b = median_breakdown([r[2] for r in per_round])
        if ours_b:
            print(f"\n== batch {c.batch_size}, base {c.base_channels}: breakdown, median of {args.rounds} rounds")
            print_breakdown(c, ours_b, median_breakdown([r[3] for r in per_round]))


if __name__ == "__main__":
    sys.exit(main())
