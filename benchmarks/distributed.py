"""One machine's cores as one process or as several: images/s of the training step, and what the
communication costs.

    python benchmarks/distributed.py                  # 1 process x 1 thread, x every core, N processes x 1 thread
    python benchmarks/distributed.py --processes 2 --steps 20

Each configuration runs in fresh processes (this script with ``--worker``, under ``mpiexec -n N`` for
N > 1) on the standard configuration: UNet(base 16, depth 4), 128x128, global batch 8 (each of N
processes takes 8/N images), Adam, cross-entropy + Dice, float32, the CPU acceleration. One step is
what ``tinyunet train`` runs: zero_grad, forward, loss, backward, the gradient allreduce (N > 1), the
optimizer step, on a fixed random batch. Printed: the median (and min) ms per step over ``--steps``
after ``--warmup``, images/s, and for N > 1:

- allreduce, ms/step: the time spent inside ProcessGroup.allreduce during a step (the gradient's, the
  losses', synchronized BatchNorm's): transfer *and* waiting for the slowest process;
- gradient allreduce alone: the median time of allreducing the 1,942,611-float gradient by itself,
  the processes lined up by a barrier first (pure transfer on this machine: shared memory);
- the same with ``--no-sync-batchnorm`` (BatchNorm on each process's images only).

Results go to benchmarks/README.md ("Several processes"), with the CPU they were measured on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def worker(args: argparse.Namespace) -> None:
    from tinyunet import backend, distributed
    from tinyunet.backend import to_device
    from tinyunet.losses import make_loss
    from tinyunet.models import create_model
    from tinyunet.nn.norm import SyncBatchNorm
    from tinyunet.optim import Adam

    group = distributed.world()
    rank, size = (0, 1) if group is None else (group.rank, group.size)
    inside = [0.0]
    if group is not None:   # time every allreduce of a step
        allreduce = group.allreduce

        def timed(array):
            started = time.perf_counter()
            allreduce(array)
            inside[0] += time.perf_counter() - started
            return array
        group.allreduce = timed
    backend.seed(0)
    model = create_model(arch="unet", in_channels=3, num_classes=3, base_channels=16, depth=4)
    if group is not None and not args.no_sync:
        SyncBatchNorm.convert(model, group)
    loss_fn = make_loss("ce+dice", group)
    optimizer = Adam(model.parameters(), lr=1e-3)
    data = np.random.default_rng(0)
    x = data.standard_normal((args.batch_size, 3, args.size, args.size)).astype(np.float32)
    y = data.integers(0, 3, (args.batch_size, args.size, args.size))
    part = distributed.shard(args.batch_size, rank, size)
    x, y = to_device(x[part]), to_device(y[part])
    times, communication = [], []
    for step in range(args.warmup + args.steps):
        if group is not None:
            group.barrier()
        inside[0] = 0.0
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        if group is not None:
            group.allreduce(optimizer.grad)
        float(loss)
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            communication.append(inside[0])
    result = {"processes": size, "threads": int(os.environ.get("TINYUNET_NUM_THREADS", "0")),
              "sync_batchnorm": group is not None and not args.no_sync,
              "median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times)),
              "allreduce_ms": 1e3 * float(np.median(communication)),
              "parameters": int(optimizer.grad.size)}
    if group is not None:
        alone = []
        for _ in range(20):
            group.barrier()
            inside[0] = 0.0
            group.allreduce(optimizer.grad)
            alone.append(inside[0])
        result["gradient_allreduce_ms"] = 1e3 * float(np.median(alone))
    if rank == 0:
        print(json.dumps(result))


def run(processes: int, threads: int, args: argparse.Namespace, no_sync: bool = False) -> dict:
    env = {**os.environ, "TINYUNET_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--size", str(args.size), "--batch-size", str(args.batch_size)] + (["--no-sync"] if no_sync else [])
    if processes > 1:
        command = [str(BIN / "mpiexec"), "-n", str(processes)] + command
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-sync", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the configurations this many times")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    cores = args.processes
    configurations = [(1, 1, False), (1, cores, False), (cores, 1, False), (cores, 1, True)]
    results = {c: [] for c in configurations}
    for _ in range(args.rounds):
        for c in configurations:
            results[c].append(run(*c[:2], args, no_sync=c[2]))
    print(f"global batch {args.batch_size} at {args.size}x{args.size}, standard U-Net, float32, "
          f"median of {args.steps} steps, best of {args.rounds} rounds")
    print(f"{'configuration':<50}{'ms/step':>9}{'img/s':>8}{'allreduce ms/step':>19}{'gradient alone ms':>19}")
    for (processes, threads, no_sync), rs in results.items():
        best = min(rs, key=lambda r: r["median_ms"])
        name = (f"{processes} process{'es' if processes > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
                + (", BatchNorm per process" if no_sync else ", synchronized BatchNorm" if processes > 1 else ""))
        comm = f"{best['allreduce_ms']:.1f}" if processes > 1 else "-"
        alone = f"{best['gradient_allreduce_ms']:.2f}" if processes > 1 else "-"
        print(f"{name:<50}{best['median_ms']:>9.1f}{1e3 * args.batch_size / best['median_ms']:>8.1f}{comm:>19}"
              f"{alone:>19}")
    bytes_per_step = 4 * results[configurations[0]][0]["parameters"]
    print(f"gradient: {bytes_per_step / 4:,.0f} float32 = {bytes_per_step / 1e6:.2f} MB per step and process")


if __name__ == "__main__":
    main()
