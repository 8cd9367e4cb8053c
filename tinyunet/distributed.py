"""Training on several processes: the process group, its collective operations, and the shards.

``mpiexec -n N tinyunet train ...`` starts N copies of the same program. Each holds the whole model
and takes its shard of every global batch; the losses and synchronized BatchNorm add up their sums
over the processes, and before each optimizer step so do the gradients (an *allreduce*). Every copy
then takes the same step with the same gradient: the one a single process computes on the whole
batch (lesson 18 shows why, and the tests check it to float rounding).

The processes talk through MPI (mpi4py), the standard of scientific computing, and nothing else:
``ProcessGroup`` wraps the few operations training needs - allreduce (a sum, in place), broadcast,
barrier, abort. On a GPU the allreduce of device arrays goes through NCCL (``cupyx.distributed``),
so the gradients never leave the GPUs; MPI still starts the processes and hands NCCL its id.

A single process (no mpiexec, or ``-n 1``) has no group at all: ``world()`` returns None and
training runs exactly as it always did.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional, Tuple, TypeVar

import numpy as np

from tinyunet.errors import TinyUNetError

#: the environment variables by which launchers tell a process how many were started (MPICH's and Intel
#: MPI's hydra; Open MPI; MVAPICH; Slurm's srun, last: an mpiexec inside a Slurm job inherits srun's
#: variables from the daemons srun started for it, so an MPI launcher's own count comes first)
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")

INSTALL_HINT = "pip install -e '.[dist]' (mpi4py and MPICH)"


def launched_size() -> int:
    """How many processes mpiexec/mpirun/srun started, from the launcher's environment (1: none)."""
    return _launcher()[1]


def _launcher() -> Tuple[str, int]:
    """The first of LAUNCHER_SIZE_VARIABLES that is set, and its count; ("", 1) when none is."""
    for name in LAUNCHER_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return name, int(value)
    return "", 1


class ProcessGroup:
    """The processes of one training: ``rank`` (0 .. size-1), ``size``, and their collectives.

    ``comm`` is an mpi4py communicator (``MPI.COMM_WORLD``). Host arrays go through MPI; device
    (CuPy) arrays through NCCL, which is set up on the first device allreduce.
    """

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.nccl: Any = None

    def allreduce(self, array: Any) -> Any:
        """Sum ``array`` over the processes in place: afterwards every process holds the same sum.
        -> ``array``. Each process passes an array of the same shape and dtype (contiguous)."""
        if isinstance(array, np.ndarray):
            if not array.flags.c_contiguous:
                raise ValueError("allreduce needs a contiguous array")
            self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        else:
            if self.nccl is None:
                self.nccl = nccl_communicator(self.size, self.rank)
            self.nccl.all_reduce(array, array, op="sum")
        return array

    def broadcast(self, value: Any, root: int = 0) -> Any:
        """``value`` of process ``root``, on every process (a small Python object)."""
        return self.comm.bcast(value, root=root)

    def barrier(self) -> None:
        """Wait until every process has come here."""
        self.comm.Barrier()

    def abort(self, code: int = 1, grace: float = 1.0) -> None:
        """End every process of the job (an error in one must not leave the others waiting forever).

        What this process printed last (the error) travels to the user through the launcher: a pipe to its
        proxy, a socket to ``mpiexec``. MPI_Abort kills the job at once and may cut that path, and the error
        is then lost. So: flush, give the launcher ``grace`` seconds to pass the lines on, then abort."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(grace)
        self.comm.Abort(code)

    def local_rank(self) -> int:
        """This process's rank among those on the same machine (which GPU it takes)."""
        return self._machine().Get_rank()

    def local_size(self) -> int:
        """How many of the processes run on this machine (how its cores are shared)."""
        return self._machine().Get_size()

    def _machine(self) -> Any:
        """The communicator of the processes that share this machine's memory."""
        return self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)


def nccl_communicator(size: int, rank: int) -> Any:
    """NCCL over the processes' GPUs (CuPy); MPI passes NCCL's id around (``use_mpi``)."""
    import cupyx.distributed

    return cupyx.distributed.init_process_group(size, rank, use_mpi=True)


def world() -> Optional[ProcessGroup]:
    """All the processes mpiexec started, or None for a single process."""
    launcher, size = _launcher()
    if size <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise TinyUNetError(f"started as one of {size} processes (mpiexec), but mpi4py is not installed: "
                            f"{INSTALL_HINT}") from None
    group = ProcessGroup(MPI.COMM_WORLD)
    if group.size != size and launcher == "SLURM_STEP_NUM_TASKS":
        # srun without a PMI that mpi4py's MPI speaks: each task would train alone, all in one folder
        raise TinyUNetError(f"srun started {size} tasks but MPI sees {group.size}: srun's MPI plugin does not match "
                            "mpi4py's MPI (try `srun --mpi=pmi2` or `--mpi=pmix`, `srun --mpi=list` shows them), "
                            f"or run `mpiexec -n {size} tinyunet ...` inside the allocation")
    if group.size != size:
        # an mpiexec of another MPI than mpi4py's: each process would train alone, all in one folder
        raise TinyUNetError(f"mpiexec started {size} processes but MPI sees {group.size}: that mpiexec belongs to "
                            "another MPI than mpi4py's; use the one installed with it (`python -m pip show mpich`, "
                            "the mpiexec beside this Python)")
    return group


T = TypeVar("T")


def first_process_first(group: Optional[ProcessGroup], load: Callable[[], T]) -> T:
    """``load()`` in process 0, then in the others (a barrier between): the first fills the data cache that
    the others then read, instead of all of them decoding the same photos at once. No group: ``load()``."""
    first = group is None or group.rank == 0
    if not first:
        group.barrier()
    result = load()
    if first and group is not None:
        group.barrier()
    return result


def shard(count: int, rank: int, size: int) -> slice:
    """Process ``rank``'s part of ``count`` items: contiguous, sizes differing by at most one, in order."""
    return slice(rank * count // size, (rank + 1) * count // size)


def use_local_gpu(group: ProcessGroup) -> None:
    """Each process of a machine on its own GPU (round robin), before any array is made."""
    import cupy

    cupy.cuda.Device(group.local_rank() % cupy.cuda.runtime.getDeviceCount()).use()
