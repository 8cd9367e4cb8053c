"""Training on several processes (tinyunet/distributed.py, SyncBatchNorm, the losses over a group, the
Trainer's shards): two processes under ``mpiexec -n 2`` against one process.

The step-level checks run tests/distributed_check.py alone and under mpiexec and compare in float64
(to rounding); the training-level checks run `tinyunet train` itself.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinyunet import distributed
from tinyunet.data import iterate_batches, make_shapes
from tinyunet.data.transforms import Augmentation

HERE = Path(__file__).resolve().parent
CHECK = HERE / "distributed_check.py"
BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec")
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "TINYUNET_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
for name in distributed.LAUNCHER_SIZE_VARIABLES:
    ENV.pop(name, None)


def run(args, processes: int = 1, timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
    command = ([MPIEXEC, "-n", str(processes)] if processes > 1 else []) + [str(a) for a in args]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def step_check(tmp_path: Path, name: str, *options, processes: int = 1) -> dict:
    out = tmp_path / f"{name}.npz"
    run([sys.executable, CHECK, out, *options], processes=processes)
    with np.load(out) as f:
        return dict(f)


def relative_difference(a: dict, b: dict, prefix: str = "") -> dict:
    keys = {k for k in b if k.startswith(prefix) and k != "nccl_allreduces"}
    assert keys and set(a) >= keys
    return {k: float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-30)) for k in keys}


def test_mpiexec_is_installed_with_the_test_extra():
    """The tests below need MPI from the [test] extra (mpi4py + MPICH's wheel): a missing one is a failure,
    not a skip."""
    assert Path(MPIEXEC).is_file(), f"no mpiexec beside {sys.executable}: pip install -e '.[test]'"
    # process 0 prints what every process says (two processes printing at once may mix their lines)
    code = "from mpi4py import MPI; c = MPI.COMM_WORLD; ranks = c.gather((c.rank, c.size)); c.rank or print(ranks)"
    result = run([sys.executable, "-c", code], processes=2)
    assert result.stdout.strip() == "[(0, 2), (1, 2)]"


# --- one step and a few: two processes with synchronized BatchNorm = one process, float64 --------------
@pytest.mark.parametrize("arch,loss,batch", [("unet", "ce+dice", 4), ("unet", "dice", 5),
                                             ("resunet", "ce", 4), ("attunet", "ce+dice", 3)])
def test_two_processes_take_the_steps_of_one(tmp_path, arch, loss, batch):
    """Logits of the first forward, gradients of the first backward, the losses of 3 Adam steps and the
    weights and BatchNorm statistics after them: the same to rounding (batch 5 and 3: unequal shards)."""
    options = ["--arch", arch, "--loss", loss, "--batch", batch]
    one = step_check(tmp_path, "one", *options)
    two = step_check(tmp_path, "two", *options, processes=2)
    assert set(one) == set(two)
    assert one["logits"].shape[0] == batch
    differences = relative_difference(one, two)
    worst = max(differences, key=differences.get)
    assert differences[worst] < 1e-10, (worst, differences[worst])
    # and the steps did something: the weights moved
    start = step_check(tmp_path, "start", *options, "--steps", 0)
    moved = relative_difference(one, start, "state/")
    assert max(moved.values()) > 1e-3


@pytest.mark.parametrize("layers", ["--no-accel", "--numpy-batchnorm"])
def test_two_processes_on_each_batchnorm(tmp_path, layers):
    """The same with the acceleration off (tinyunet/nn's BatchNorm2d and its SyncBatchNorm hooks), and with
    the acceleration's NumPy BatchNorm (RowsBatchNorm: it re-centres its kept x - mean on the processes'
    mean) instead of its compiled loops (the default where Numba is installed, tested above)."""
    one = step_check(tmp_path, "one", layers)
    two = step_check(tmp_path, "two", layers, processes=2)
    assert max(relative_difference(one, two).values()) < 1e-10


def test_two_processes_in_float32_are_close(tmp_path):
    """float32: the sums are added in another order, so close rather than equal."""
    one = step_check(tmp_path, "one", "--dtype", "float32", "--batch", 8)
    two = step_check(tmp_path, "two", "--dtype", "float32", "--batch", 8, processes=2)
    assert max(relative_difference(one, two, "logits").values()) < 1e-5
    assert max(relative_difference(one, two, "loss/").values()) < 1e-5
    weights = relative_difference(one, two, "state/")
    assert np.median(list(weights.values())) < 1e-5 and max(weights.values()) < 1e-3


def test_gpu_allreduce_goes_through_nccl_on_device_arrays(tmp_path):
    """On the CuPy stand-in every reduction of device arrays goes to cupyx.distributed's NCCL
    all_reduce (the script's stand-in refuses host arrays), and the steps are still one process's."""
    one = step_check(tmp_path, "one")
    two = step_check(tmp_path, "two", "--backend", "fake-cupy", processes=2)
    # per step: 2 losses + 2 per BatchNorm layer (forward's sums, backward's) + the gradient
    assert int(two["nccl_allreduces"]) == 3 * (2 + 2 * 10 + 1)
    assert max(relative_difference(one, two).values()) < 1e-10


def test_without_synchronized_batchnorm_each_process_normalises_its_own_shard(tmp_path):
    """--no-sync: each process's BatchNorm uses its shard's statistics. That is not one process's step
    (the gradients differ by far more than rounding), but exactly that of N model copies each normalising
    its own shard, with one loss over all their logits - computed in one process without tinyunet.distributed."""
    one = step_check(tmp_path, "one", "--loss", "ce")
    two = step_check(tmp_path, "two", "--loss", "ce", "--no-sync", processes=2)
    copies = step_check(tmp_path, "copies", "--loss", "ce", "--simulate", 2)
    assert max(relative_difference(copies, two).values()) < 1e-10
    assert max(relative_difference(one, two, "grad/").values()) > 1e-2


# --- shards ---------------------------------------------------------------------------------------------
def test_shards_cover_the_batch_in_order():
    for count in range(0, 23):
        for size in range(1, 6):
            parts = [distributed.shard(count, rank, size) for rank in range(size)]
            items = [i for p in parts for i in range(count)[p]]
            assert items == list(range(count))
            lengths = [len(range(count)[p]) for p in parts]
            assert max(lengths) - min(lengths) <= 1


def test_a_shard_of_an_augmented_batch_is_that_part_of_the_whole_batch():
    data = make_shapes(24, 32, seed=0)
    settings = Augmentation(flip=True, scale=0.6, rotate=15, brightness=0.2, contrast=0.2, saturation=0.2)
    whole = list(iterate_batches(data, 7, shuffle=True, rng=np.random.default_rng(5), augment=settings))
    for size in (2, 3):
        parts = [list(iterate_batches(data, 7, shuffle=True, rng=np.random.default_rng(5), augment=settings,
                                      shard=lambda n, r=r: distributed.shard(n, r, size))) for r in range(size)]
        for b, (x, y, names) in enumerate(whole):
            assert np.array_equal(np.concatenate([p[b][0] for p in parts]), x)
            assert np.array_equal(np.concatenate([p[b][1] for p in parts]), y)
            assert sum((p[b][2] for p in parts), []) == names


# --- `mpiexec -n 2 tinyunet train` ------------------------------------------------------------------------
TRAIN = ["--dataset", "shapes", "--num-shapes", "48", "--size", "32", "--batch-size", "8", "--quiet", "--seed", "4"]


def tinyunet(*args) -> list:
    return [str(BIN / "tinyunet"), *map(str, args)]


def metrics(run_dir: Path) -> list:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def weights(run_dir: Path) -> dict:
    with np.load(run_dir / "last.npz") as f:
        return {k: f[k] for k in f.files if k.startswith("model/")}


def test_mpiexec_tinyunet_train_matches_one_process_and_a_fresh_evaluation(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(tinyunet("train", "--out", one, "--epochs", 2, *TRAIN))
    result = run(tinyunet("train", "--out", two, "--epochs", 2, *TRAIN), processes=2)
    # one process writes and prints
    assert result.stdout.count("epoch 2/2") == 1 and "done (2 processes)" in result.stdout
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert json.loads((two / "config.json").read_text()) == json.loads((one / "config.json").read_text())
    # float32 over 12 steps: close. Adam moves a weight by up to lr whatever its gradient's size, so a
    # gradient near 0 whose sign the rounding flips moves it 2 lr apart: the bound is 2 lr per step
    a, b = weights(one), weights(two)
    assert set(a) == set(b)
    largest = max(float(np.abs(a[k] - b[k]).max()) for k in a if "running" not in k)
    assert largest < 2 * 1e-3 * 12
    assert np.median([float(np.abs(a[k] - b[k]).mean()) for k in a]) < 1e-4
    rows_one, rows_two = metrics(one), metrics(two)
    for r1, r2 in zip(rows_one, rows_two):
        assert abs(float(r1["train_loss"]) - float(r2["train_loss"])) < 1e-3
        assert abs(float(r1["val_miou"]) - float(r2["val_miou"])) < 2e-2
    # the sharded validation of the two processes against one process evaluating the saved weights anew
    evaluation = run([sys.executable, "-c", f"""
import json
from tinyunet.train import TrainConfig, load_data, load_model, evaluate_model
config = TrainConfig.from_dict(json.load(open({str(two / 'config.json')!r})))
model, _ = load_model({str(two / 'last.npz')!r})
print(json.dumps(evaluate_model(model, load_data(config, progress=False)[1])["miou"]))
"""])
    assert abs(json.loads(evaluation.stdout) - float(rows_two[-1]["val_miou"])) < 1e-4
    # `tinyunet evaluate` shared by two processes: one report, the metrics of one process
    alone = json.loads(run(tinyunet("evaluate", "--checkpoint", two, "--json")).stdout)
    shared = run(tinyunet("evaluate", "--checkpoint", two, "--json"), processes=2).stdout.strip().splitlines()
    assert len(shared) == 1
    shared = json.loads(shared[0])
    assert shared["num_images"] == alone["num_images"] and abs(shared["miou"] - alone["miou"]) < 1e-4
    assert np.abs(np.array(shared["confusion"]) - alone["confusion"]).sum() <= 4


def process_of_rank(marker: str, rank: int) -> int:
    """The pid of the training process of MPI rank ``rank`` whose command line holds ``marker``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in command and "tinyunet" in command and f"PMI_RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} for {marker}")


def test_a_killed_process_ends_the_job_and_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run(tinyunet("train", "--out", whole, "--epochs", 3, *TRAIN), processes=2)
    job = subprocess.Popen([MPIEXEC, "-n", "2", *tinyunet("train", "--out", broken, "--epochs", 3, *TRAIN)],
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (broken / "last.npz").is_file():   # epoch 1 saved
            assert job.poll() is None and time.time() < deadline, "the training ended before its first epoch"
            time.sleep(0.2)
        os.kill(process_of_rank(str(broken), 1), signal.SIGKILL)
        job.wait(timeout=60)   # no hang: the job ends with its killed process
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert len(metrics(broken)) < 3
    result = run(tinyunet("train", "--out", broken, "--epochs", 3, "--resume", "--quiet"), processes=2)
    assert "resuming" in result.stdout
    a, b = weights(whole), weights(broken)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert [r["val_miou"] for r in metrics(whole)] == [r["val_miou"] for r in metrics(broken)]


@pytest.mark.parametrize("where", ["every process", "the second process only"])
def test_an_error_ends_every_process_with_its_line(tmp_path, where):
    """A user error (a batch smaller than the number of processes) ends every process, and the user reads its
    one line: the process with the error flushes and waits a moment before MPI_Abort, which may otherwise cut
    the launcher's forwarding of what was printed. With the error in the second process only (two programs,
    mpiexec's ``:``), the first is already on its way into training and must be ended too. Three times each:
    the lost line was a race."""
    train = tinyunet("train", "--out", tmp_path / "r", "--dataset", "shapes", "--batch-size")
    if where == "every process":
        command = [MPIEXEC, "-n", "2", *train, "1"]
    else:
        command = [MPIEXEC, "-n", "1", *train, "4", ":", "-n", "1", *train, "1"]
    for _ in range(3):
        result = subprocess.run([str(c) for c in command], env=ENV, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (result.returncode, result.stderr)
        assert "tinyunet train: error: --batch-size 1 is smaller than the 2 processes" in result.stderr
        assert "Traceback" not in result.stderr


def test_without_mpi4py_one_line_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None; from tinyunet.cli import main; "
            f"sys.exit(main(['train', '--dataset', 'shapes', '--out', {str(tmp_path / 'r')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], env={**ENV, "PMI_SIZE": "2"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tinyunet train: error: started as one of 2 processes (mpiexec), but mpi4py is not installed: "
        f"{distributed.INSTALL_HINT}"]


def test_an_mpiexec_of_another_mpi_is_refused(tmp_path):
    """Open MPI's mpiexec with MPICH's mpi4py: every process would see itself alone and all would train
    into one folder. The launcher's count and MPI's disagree: an error instead."""
    result = subprocess.run(tinyunet("train", "--dataset", "shapes", "--out", tmp_path / "r"),
                            env={**ENV, "OMPI_COMM_WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "belongs to another MPI" in result.stderr
    assert not (tmp_path / "r").exists()


def test_srun_tasks_that_mpi_does_not_join_are_refused(tmp_path):
    """srun -n 2 with an MPI plugin that mpi4py's MPI does not speak: each task's MPI sees one process. Every
    task would train alone into one folder; srun's task count and MPI's disagree: an error instead."""
    result = subprocess.run(tinyunet("train", "--dataset", "shapes", "--out", tmp_path / "r"),
                            env={**ENV, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "srun started 2 tasks but MPI sees 1" in result.stderr and "mpiexec -n 2" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("variables,size", [({}, 1), ({"SLURM_STEP_NUM_TASKS": "1"}, 1),
                                            ({"SLURM_STEP_NUM_TASKS": "4"}, 4),
                                            # mpiexec inside a Slurm job: its own count, not srun's
                                            ({"SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": "3"}, 3),
                                            ({"SLURM_STEP_NUM_TASKS": "2", "OMPI_COMM_WORLD_SIZE": "8"}, 8)])
def test_the_launchers_count_of_processes(monkeypatch, variables, size):
    for name in distributed.LAUNCHER_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert distributed.launched_size() == size


REAL_PETS = Path(os.environ.get("TINYUNET_DATA") or HERE.parents[1] / "shared" / "data" / "oxford-iiit-pet")


@pytest.mark.skipif(not (REAL_PETS / "annotations" / "trainval.txt").is_file(),
                    reason=f"real Oxford-IIIT Pet data not found at {REAL_PETS}")
def test_mpiexec_trains_real_pets_as_one_process_does(tmp_path):
    """The pets recipe (every augmentation, cross-entropy + Dice) on 40 real photos at 64x64: two processes,
    each its share of every augmented batch, against one process."""
    options = ["train", "--data", REAL_PETS, "--limit", 40, "--size", 64, "--epochs", 2, "--batch-size", 8,
               "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(tinyunet(*options, "--out", one))
    result = run(tinyunet(*options, "--out", two), processes=2)
    assert "2 processes, each 4 images of every batch of 8, synchronized BatchNorm" in result.stdout
    # float32: close. The bounds separate rounding from a real difference: with a planted bug that gives
    # one process the flips of the other's images, epoch 1's loss moved by 1.9e-3 (rounding: 2.5e-5) and
    # the parameters' median mean difference was 1.2e-3 (rounding: 1.1e-4)
    a, b = weights(one), weights(two)
    steps = 2 * (36 // 8)                              # 36 training images (4 held out), 2 epochs
    parameters = [k for k in a if "running" not in k]
    assert max(float(np.abs(a[k] - b[k]).max()) for k in parameters) < 2 * 1e-3 * steps
    assert np.median([float(np.abs(a[k] - b[k]).mean()) for k in parameters]) < 3e-4
    rows_one, rows_two = metrics(one), metrics(two)
    assert abs(float(rows_one[0]["train_loss"]) - float(rows_two[0]["train_loss"])) < 1e-4
    for r1, r2 in zip(rows_one, rows_two):
        assert abs(float(r1["train_loss"]) - float(r2["train_loss"])) < 5e-4
    # evaluation on real test photos shared by two processes, at 64x64 and at each photo's own size
    evaluate = tinyunet("evaluate", "--checkpoint", two, "--split", "test", "--limit", 21, "--json")
    alone, shared = json.loads(run(evaluate).stdout), json.loads(run(evaluate, processes=2).stdout)
    assert shared["num_images"] == alone["num_images"] == 21
    for scores_alone, scores_shared in ((alone, shared), (alone["native"], shared["native"])):
        assert abs(scores_alone["miou"] - scores_shared["miou"]) < 1e-4
        assert sum(map(sum, scores_alone["confusion"])) == sum(map(sum, scores_shared["confusion"]))


def test_without_synchronized_batchnorm_the_processes_validate_one_model(tmp_path):
    """--no-sync-batchnorm: each process's running statistics follow its own shards, and are averaged at
    each epoch's end, so the sharded validation scores one model: the saved one, evaluated anew by one
    process, gives the logged mIoU and loss (without the average, process 1 would score its own statistics)."""
    run_dir = tmp_path / "nosync"
    result = run(tinyunet("train", "--out", run_dir, "--epochs", 1, "--no-sync-batchnorm", *TRAIN), processes=2)
    assert "BatchNorm per process" in result.stdout
    assert json.loads((run_dir / "config.json").read_text())["sync_batchnorm"] is False
    evaluation = run([sys.executable, "-c", f"""
import json
from tinyunet.train import TrainConfig, load_data, load_model, evaluate_model
config = TrainConfig.from_dict(json.load(open({str(run_dir / 'config.json')!r})))
model, _ = load_model({str(run_dir / 'last.npz')!r})
result = evaluate_model(model, load_data(config, progress=False)[1])
print(json.dumps([result["miou"], result["loss"]]))
"""])
    miou, loss = json.loads(evaluation.stdout)
    row = metrics(run_dir)[-1]
    assert abs(miou - float(row["val_miou"])) < 1e-4 and abs(loss - float(row["val_loss"])) < 1e-4


def test_first_process_loads_before_the_others():
    """first_process_first: process 1 starts loading only after process 0 has finished (the cache it fills is
    then complete); each process gets its own load's result; without a group it is just the call."""
    import threading

    rendezvous, events = threading.Barrier(2), []

    class ThreadGroup:               # two "processes" as threads, meeting at a real barrier
        def __init__(self, rank):
            self.rank, self.size = rank, 2

        def barrier(self):
            rendezvous.wait(timeout=10)

    def load(rank):
        events.append(("start", rank))
        time.sleep(0.05 if rank == 0 else 0.0)     # process 0 is slow: a wrong order would show
        events.append(("end", rank))
        return rank * 10

    results = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, distributed.first_process_first(
        ThreadGroup(r), lambda: load(r)))) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert events == [("start", 0), ("end", 0), ("start", 1), ("end", 1)], events
    assert results == {0: 0, 1: 10}
    assert distributed.first_process_first(None, lambda: "alone") == "alone"


def test_running_statistics_are_the_processes_average():
    """--no-sync-batchnorm: at each epoch's end every process's BatchNorm running statistics become the
    average of the processes' (two threads as two processes, their allreduce a real sum at a barrier); the
    expected values are the two models' buffers averaged here, one by one. Summed without the division, both
    processes would hold the same doubled statistics and a validation of either would agree with the other."""
    import threading
    from types import SimpleNamespace

    from tinyunet.models import UNet
    from tinyunet.train import Trainer

    barrier, shared = threading.Barrier(2), {}

    class ThreadGroup:
        size = 2

        def __init__(self, rank):
            self.rank = rank

        def allreduce(self, array):
            shared[self.rank] = array.copy()
            barrier.wait()
            total = shared[0] + shared[1]
            barrier.wait()
            array[...] = total
            return array

    models = []
    for rank in range(2):
        model = UNet(3, 3, base_channels=2, depth=2)
        rng = np.random.default_rng(rank)
        for module in model.modules():
            for name in module.buffer_names:
                setattr(module, name, rng.uniform(0.5, 2.0, getattr(module, name).shape).astype(np.float32))
        models.append(model)
    before = [{k: v.copy() for k, v in m.named_buffers()} for m in models]
    assert before[0] and any(not np.array_equal(before[0][k], before[1][k]) for k in before[0])
    threads = [threading.Thread(target=Trainer._average_running_statistics,
                                args=(SimpleNamespace(model=models[r], group=ThreadGroup(r)),)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for model in models:
        for name, value in model.named_buffers():
            np.testing.assert_allclose(value, (before[0][name] + before[1][name]) / 2, rtol=1e-6)
