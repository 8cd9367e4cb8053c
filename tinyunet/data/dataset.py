"""The in-memory dataset shared by the real (pets) and synthetic (shapes) data, plus split and batching.

Everything here lives on the host: uint8 photos and class ids are 4-8x smaller than float32, so we
keep them as uint8 and convert one batch at a time in :func:`iterate_batches`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from tinyunet.classes import NUM_CLASSES
from tinyunet.data.transforms import Augmentation, to_input
from tinyunet.data.transforms import augment as _augment

__all__ = ["SegmentationData", "split_train_val", "iterate_batches"]


@dataclass
class SegmentationData:
    """A set of square photos with per-pixel class ids.

    Attributes:
        images: uint8 (N, S, S, 3) RGB photos.
        labels: uint8 (N, S, S) class ids (see :mod:`tinyunet.classes`).
        names: N example names (file stems, e.g. ``"Abyssinian_1"``).
        skipped: (name, reason) for examples the loader could not use.
        notes: (name, note) for examples used with a remark (an animation: its first frame).
    """

    images: np.ndarray
    labels: np.ndarray
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.names)
        if self.images.shape[:1] != (n,) or self.labels.shape[:1] != (n,):
            raise ValueError(
                f"images {self.images.shape}, labels {self.labels.shape} and {n} names disagree on N"
            )
        if self.images.ndim != 4 or self.images.shape[1:3] != self.labels.shape[1:3]:
            raise ValueError(f"images {self.images.shape} must be (N, S, S, 3) matching labels {self.labels.shape}")
        # Labels are checked here, where data enters, on the host: on a GPU an out-of-range class id
        # would index silently (CuPy wraps indices instead of raising) and checking it there costs a sync.
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= NUM_CLASSES):
            bad = [self.names[i] for i in np.flatnonzero(((self.labels < 0) | (self.labels >= NUM_CLASSES))
                                                          .reshape(n, -1).any(axis=1))]
            raise ValueError(f"class ids must be in [0, {NUM_CLASSES}); {len(bad)} example(s) are not: "
                             f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def size(self) -> int:
        """Side length S of the square images."""
        return int(self.images.shape[1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> SegmentationData:
        """A new dataset with the examples at ``indices`` (copies; ``skipped`` and ``notes`` are carried over)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return SegmentationData(
            images=self.images[idx],
            labels=self.labels[idx],
            names=[self.names[i] for i in idx],
            skipped=list(self.skipped),
            notes=list(self.notes),
        )


def _stable_key(name: str, seed: int) -> int:
    # Python's hash() is salted per process; md5 gives the same number on every run and machine.
    return int.from_bytes(hashlib.md5(f"{seed}:{name}".encode()).digest()[:8], "little")


def split_train_val(
    data: SegmentationData, val_fraction: float = 0.1, seed: int = 0
) -> tuple[SegmentationData, SegmentationData]:
    """Split into (train, val) deterministically by a stable hash of each name.

    The same names always land on the same side, whatever their order in ``data``; the validation
    set holds ``round(N * val_fraction)`` examples (at least one when ``val_fraction > 0`` and N >= 2).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(data)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    order = sorted(range(n), key=lambda i: _stable_key(data.names[i], seed))
    val_idx = np.sort(np.array(order[:n_val], dtype=np.int64))
    train_idx = np.sort(np.array(order[n_val:], dtype=np.int64))
    return data.subset(train_idx), data.subset(val_idx)


def iterate_batches(
    data: SegmentationData,
    batch_size: int,
    shuffle: bool,
    rng: np.random.Generator | None,
    augment: bool | Augmentation = False,
    drop_last: bool = False,
    shard: Callable[[int], slice] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Yield host batches ready for ``backend.to_device``.

    Args:
        data: the dataset.
        batch_size: examples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: visit examples in a random order drawn from ``rng``.
        rng: required when ``shuffle`` or ``augment``; the same rng state gives the same batches.
        augment: an :class:`Augmentation` (random flips, crops, rotations, color jitter; photo and
            mask together), True for random horizontal flips only, False for none.
        drop_last: drop a final incomplete batch (keeps BatchNorm statistics stable).
        shard: batch size -> the part of each batch to yield (one process's, when several train on
            one global batch: tinyunet.distributed.shard); the order and the augmentation's random
            numbers are the whole batch's all the same.
    Yields:
        x float32 (B, 3, S, S) normalized; y int64 (B, S, S) class ids; names list of B strings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if rng is None and (shuffle or augment):
        # A silent default seed would give the same "random" order every epoch.
        raise ValueError("pass rng=np.random.Generator when shuffle or augment is on")
    settings = Augmentation() if augment is True else augment or None
    n = len(data)
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        part = shard(len(idx)) if shard is not None else slice(None)
        if settings is not None:  # the random numbers of the whole batch, the transforms of the part
            images, labels = _augment(data.images[idx], data.labels[idx], rng, settings, part)
        else:
            images, labels = data.images[idx[part]], data.labels[idx[part]]
        idx = idx[part]
        yield to_input(images), labels.astype(np.int64), [data.names[i] for i in idx]
