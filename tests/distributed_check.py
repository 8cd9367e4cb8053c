"""A few data-parallel training steps of a U-Net, written to an .npz file: run alone, and under
``mpiexec -n 2``; tests/test_distributed.py compares the two.

    python tests/distributed_check.py OUT.npz [--dtype float64] [--no-sync] [--loss ce+dice] [--arch unet]
                                               [--steps 3] [--batch 4] [--backend numpy|fake-cupy]

Alone (no mpiexec), the script trains on the whole batch; with ``--simulate N`` it plays N processes
without synchronized BatchNorm in one: N copies of the model, each running its shard's forward and
backward with its own BatchNorm statistics, one loss over all their logits, the gradients added up
(written independently of tinyunet.distributed, to check the no-sync runs against). Under mpiexec every process takes its shard
of each batch (tinyunet.distributed.shard), with the library's pieces: SyncBatchNorm.convert, the
losses over a group, the gradient allreduce. Process 0 writes OUT.npz: the forward's logits of the
first step (gathered from every process's shard), the first step's gradients, the weights and BatchNorm
statistics after the last step, and the loss of every step.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--no-sync", action="store_true")
    parser.add_argument("--loss", default="ce+dice")
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--no-accel", action="store_true")
    parser.add_argument("--simulate", type=int, default=0)
    parser.add_argument("--numpy-batchnorm", action="store_true",
                        help="the acceleration's BatchNorm as NumPy passes (RowsBatchNorm), not compiled loops")
    args = parser.parse_args()

    from tinyunet import backend, distributed
    if args.backend == "fake-cupy":
        from tinyunet import fake_cupy
        backend.use_module(fake_cupy, "fake-cupy")
        fake_nccl(fake_cupy)
    if args.no_accel:
        backend.set_acceleration(False)
    if args.numpy_batchnorm:
        from tinyunet.accel import compiled_loops
        compiled_loops.usable = lambda *arrays: False
    from tinyunet.backend import to_device, to_host, xp
    from tinyunet.losses import make_loss
    from tinyunet.models import create_model
    from tinyunet.nn.norm import SyncBatchNorm
    from tinyunet.optim import Adam

    group = distributed.world()
    rank, size = (0, 1) if group is None else (group.rank, group.size)
    copies = max(args.simulate, 1)
    dtype = np.dtype(args.dtype)
    models = []
    for _ in range(copies):
        backend.seed(0)
        models.append(create_model(arch=args.arch, in_channels=3, num_classes=3, base_channels=4, depth=2).to(dtype))
    model = models[0]
    if group is not None and not args.no_sync:
        SyncBatchNorm.convert(model, group)
    loss_fn = make_loss(args.loss, group)
    optimizer = Adam(model.parameters(), lr=1e-2)
    data = np.random.default_rng(1)
    record = {}
    for step in range(args.steps):
        # a new batch each step; its shard for this process
        x = data.standard_normal((args.batch, 3, args.size, args.size)).astype(dtype)
        y = data.integers(0, 3, (args.batch, args.size, args.size))
        part = distributed.shard(args.batch, rank, size)
        x, y = to_device(x[part]), to_device(y[part])
        optimizer.zero_grad()
        if copies == 1:
            logits = model.forward(x)
            loss = loss_fn.forward(logits, y)
            model.backward(loss_fn.backward())
        else:   # the shards one after the other, each through its own copy, then one loss over all
            parts = [distributed.shard(args.batch, k, copies) for k in range(copies)]
            for m in models[1:]:
                m.zero_grad()
            logits = xp.concatenate([m.forward(x[p]) for m, p in zip(models, parts)])
            loss = loss_fn.forward(logits, y)
            dlogits = loss_fn.backward()
            for m, p in zip(models, parts):
                m.backward(dlogits[p])
            for k, p in enumerate(model.parameters()):
                for m in models[1:]:
                    p.grad += m.parameters()[k].grad
        if group is not None:
            group.allreduce(optimizer.grad)
        if step == 0:
            shards = [to_host(logits)] if group is None else group.comm.gather(to_host(logits), root=0)
            if rank == 0:
                record["logits"] = np.concatenate(shards)
            record.update({f"grad/{name}": to_host(p.grad).copy() for name, p in model.named_parameters()})
        record[f"loss/{step}"] = np.array(float(loss))
        optimizer.step()
        for m in models[1:]:   # the copies take copy 0's step
            for p, q in zip(model.parameters(), m.parameters()):
                q.data[...] = p.data
    record.update({f"state/{k}": v for k, v in model.state_dict().items()})
    if args.backend == "fake-cupy":
        record["nccl_allreduces"] = np.array(fake_cupy.stats.get("nccl_allreduces", 0))
    if rank == 0:
        np.savez(args.out, **record)


def fake_nccl(fake_cupy) -> None:
    """cupyx.distributed for the CuPy stand-in: NCCL's all_reduce as the stand-in's device arrays see it
    (it refuses host arrays, as NCCL would), carried out by MPI on the arrays underneath."""
    import types

    from mpi4py import MPI

    class Communicator:
        def __init__(self, n_devices: int, rank: int, use_mpi: bool = False) -> None:
            assert (n_devices, rank) == (MPI.COMM_WORLD.size, MPI.COMM_WORLD.rank) and use_mpi
            self.calls = 0

        def all_reduce(self, in_array, out_array, op: str = "sum", stream=None) -> None:
            assert isinstance(in_array, fake_cupy.ndarray) and isinstance(out_array, fake_cupy.ndarray), \
                "NCCL reduces device arrays only"
            assert op == "sum"
            MPI.COMM_WORLD.Allreduce(in_array._a, out_array._a, op=MPI.SUM) if in_array is not out_array else \
                MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, out_array._a, op=MPI.SUM)
            fake_cupy.stats["nccl_allreduces"] = fake_cupy.stats.get("nccl_allreduces", 0) + 1

    module = types.ModuleType("cupyx.distributed")
    module.init_process_group = lambda n_devices, rank, use_mpi=False, **kw: Communicator(n_devices, rank, use_mpi)
    sys.modules["cupyx"] = types.ModuleType("cupyx")
    sys.modules["cupyx"].distributed = sys.modules["cupyx.distributed"] = module


if __name__ == "__main__":
    main()
