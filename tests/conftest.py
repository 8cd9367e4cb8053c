"""Shared pytest fixtures."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


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


@pytest.fixture
def numpy_backend():
    """Make NumPy the active backend for the test and again afterwards."""
    from tinyunet import backend

    backend.use("numpy")
    yield backend
    backend.use("numpy")


@pytest.fixture
def fake_cupy():
    """Install the strict CuPy stand-in (tests/fake_cupy.py) as the array module; NumPy afterwards.

    Build models *inside* the test (after this fixture) so their parameters are stand-in arrays.
    ``fake_cupy.stats["transfers"]`` counts explicit device -> host copies; ``reset_counters()``
    zeroes it. Yields the stand-in module.
    """
    import fake_cupy as fake
    from tinyunet import backend

    backend.use_module(fake, "fake-cupy")
    fake.reset_counters()
    try:
        yield fake
    finally:
        backend.use("numpy")
