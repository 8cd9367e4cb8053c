"""Shared pytest fixtures."""
from __future__ import annotations

import os

# The tests multiply small matrices and start subprocesses (CLI runs) next to each other: one BLAS
# thread per process is faster there, and OpenBLAS threads spinning on a shared 2-core machine can
# slow a step down tenfold. Set before NumPy is first imported, so NumPy's OpenBLAS reads it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@contextlib.contextmanager
def compiled_code(on: bool):
    """Inside: the compiled loops and kernels (tinyunet/accel/compiled_loops.py, direct_kernels.py) on
    where Numba is installed, or off (NumPy passes and BLAS products only); as before afterwards."""
    from tinyunet.accel import compiled_loops as kernels

    before = kernels.set_enabled(on)
    try:
        yield
    finally:
        kernels.set_enabled(before)


@pytest.fixture(scope="session", autouse=True)
def private_data_cache(tmp_path_factory):
    """Decoded pets never land in the user's cache (~/.cache/tinyunet/cache or $TINYUNET_CACHE): the
    session gets its own, which tests that need one of their own override."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TINYUNET_CACHE", str(tmp_path_factory.mktemp("tinyunet-cache")))
    yield
    patch.undo()


def write_pet_example(root: Path, name: str, width: int = 40, height: int = 30, seed: int = 0) -> None:
    """Write ``images/<name>.jpg`` (random RGB) and its trimap: an ellipse pet with a 2 px outline band."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    d = np.hypot((yy - height / 2) / (height / 3), (xx - width / 2) / (width / 3))  # 1 on the ellipse
    trimap = np.where(d < 0.85, 1, np.where(d < 1.0, 3, 2)).astype(np.uint8)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{name}.jpg", quality=90)
    Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")


def write_split(root: Path, split: str, names: Sequence[str]) -> None:
    """Write ``annotations/<split>.txt`` in the official "Name CLASS-ID SPECIES BREED-ID" format."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    lines = ["#Image CLASS-ID SPECIES BREED ID"] + [f"{n} 1 1 1" for n in names]
    (root / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def make_pets_root(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a tiny Oxford-IIIT Pet folder in the official layout, with good examples only.

    ``make_pets_root(n_trainval=6, n_test=3, root=None) -> root``; names are ``Cat_<i>`` / ``dog_<i>``.
    """

    def make(n_trainval: int = 6, n_test: int = 3, root: Path | None = None) -> Path:
        root = root or tmp_path / "pets"
        trainval = [f"Cat_{i}" for i in range(n_trainval)]
        test = [f"dog_{i}" for i in range(n_test)]
        for i, name in enumerate(trainval + test):
            write_pet_example(root, name, width=40 + 4 * (i % 3), height=30 + 2 * (i % 2), seed=i)
        write_split(root, "trainval", trainval)
        write_split(root, "test", test)
        return root

    return make


@pytest.fixture
def write_example() -> Callable[..., None]:
    """The :func:`write_pet_example` helper, for tests that build bad examples next to good ones."""
    return write_pet_example


@pytest.fixture
def write_split_file() -> Callable[..., None]:
    """The :func:`write_split` helper: ``write_split_file(root, split, names)``."""
    return write_split


# --- array backend fixtures (tests of nn/, losses, optim, models, backend) -------------------------


@pytest.fixture(params=["reference", "accelerated"])
def accel_mode(request):
    """Run the test twice: with the reference layers alone (TINYUNET_ACCEL=0) and with the CPU
    acceleration choosing what it runs (the default); the acceleration as before afterwards."""
    from tinyunet import backend

    before = backend.set_acceleration(request.param == "accelerated")
    yield request.param
    backend.set_acceleration(before)


@pytest.fixture
def reference_only():
    """The reference layers alone for this test (as TINYUNET_ACCEL=0)."""
    from tinyunet import backend

    before = backend.set_acceleration(False)
    yield
    backend.set_acceleration(before)


@pytest.fixture
def numpy_backend():
    """Make NumPy the active backend for the test and again afterwards."""
    from tinyunet import backend

    backend.use("numpy")
    yield backend
    backend.use("numpy")


@pytest.fixture
def fake_cupy():
    """Install the strict CuPy stand-in (tinyunet/fake_cupy.py) as the array module; NumPy afterwards.

    Build models *inside* the test (after this fixture) so their parameters are stand-in arrays.
    ``fake_cupy.stats["transfers"]`` counts explicit device -> host copies; ``reset_counters()``
    zeroes it. Yields the stand-in module.
    """
    from tinyunet import fake_cupy as fake
    from tinyunet import backend

    backend.use_module(fake, "fake-cupy")
    fake.reset_counters()
    try:
        yield fake
    finally:
        backend.use("numpy")


# --- CLI and workflow tests (test_cli.py, test_train.py, test_evaluate_predict.py) -----------------


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """Isolate a CLI test: NumPy backend; cache and default data folder under tmp_path, never ~/.cache.

    Yields the environment (a dict) to pass to subprocesses.
    """
    import os

    from tinyunet import backend

    monkeypatch.setenv("TINYUNET_BACKEND", "numpy")
    monkeypatch.setenv("TINYUNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TINYUNET_DATA", str(tmp_path / "no-data-here"))
    backend.use("numpy")
    yield dict(os.environ)
    backend.use("numpy")


@pytest.fixture
def run_cli(capsys, cli_env):
    """``run_cli(*args) -> (exit status, stdout, stderr)`` of ``tinyunet.cli.main`` run in-process."""
    from tinyunet.cli import main

    def run(*args):
        capsys.readouterr()
        status = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def run_cli_subprocess(cli_env):
    """``run_cli_subprocess(*args) -> CompletedProcess``: ``python -m tinyunet.cli`` in a child process."""
    import subprocess
    import sys

    def run(*args, timeout=120):
        return subprocess.run([sys.executable, "-m", "tinyunet.cli", *map(str, args)], env=cli_env,
                              capture_output=True, text=True, timeout=timeout)

    return run
