"""The one class table: ids, names, trimap values and colors, used by data, metrics, plots and predictions.

The Oxford-IIIT Pet trimaps store 1 = pet, 2 = background, 3 = outline ("not classified", the band
around the pet). tinyunet's class id is simply ``trimap value - 1``, so ids start at 0 as a
cross-entropy loss and a confusion matrix expect.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "SegClass",
    "CLASSES",
    "CLASS_NAMES",
    "NUM_CLASSES",
    "PALETTE",
    "trimap_to_labels",
    "labels_to_rgb",
]


@dataclass(frozen=True)
class SegClass:
    """One segmentation class: its id (index into logits), name, trimap pixel value and RGB color."""

    id: int
    name: str
    trimap_value: int
    color: tuple[int, int, int]


CLASSES: tuple[SegClass, ...] = (
    SegClass(0, "pet", 1, (230, 120, 30)),  # orange: the thing we look for
    SegClass(1, "background", 2, (40, 40, 60)),  # dark: recedes in plots
    SegClass(2, "outline", 3, (250, 230, 80)),  # light yellow: a thin band, must stand out
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
NUM_CLASSES: int = len(CLASSES)
#: (NUM_CLASSES, 3) uint8; ``PALETTE[labels]`` colors a label map.
PALETTE: np.ndarray = np.array([c.color for c in CLASSES], dtype=np.uint8)
PALETTE.setflags(write=False)  # a shared constant: nobody should recolor it in place

# Lookup table trimap value -> class id; 255 marks values that are not in the table.
_TRIMAP_LUT = np.full(256, 255, dtype=np.uint8)
for _c in CLASSES:
    _TRIMAP_LUT[_c.trimap_value] = _c.id


def trimap_to_labels(trimap: np.ndarray) -> np.ndarray:
    """Map trimap values {1, 2, 3} to class ids {0, 1, 2}.

    Args:
        trimap: integer array of any shape, e.g. (H, W), values in {1, 2, 3}.
    Returns:
        uint8 array of the same shape with class ids.
    Raises:
        ValueError: if a value is outside {1, 2, 3} (callers that read files turn this into a skip).
    """
    trimap = np.asarray(trimap)
    if trimap.size and (trimap.min() < 0 or trimap.max() > 255):
        raise ValueError(f"trimap values must be in {{1, 2, 3}}, got range [{trimap.min()}, {trimap.max()}]")
    labels = _TRIMAP_LUT[trimap.astype(np.uint8, copy=False)]
    if (labels == 255).any():
        bad = np.unique(trimap[labels == 255])
        raise ValueError(f"trimap values must be in {{1, 2, 3}}, found {bad.tolist()[:10]}")
    return labels


def labels_to_rgb(labels: np.ndarray) -> np.ndarray:
    """Color a label map with :data:`PALETTE`.

    Args:
        labels: integer class ids, shape (H, W) or (N, H, W), values in [0, NUM_CLASSES).
    Returns:
        uint8 array of shape labels.shape + (3,).
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"class ids must be in [0, {NUM_CLASSES}), got range [{labels.min()}, {labels.max()}]")
    return PALETTE[labels]
