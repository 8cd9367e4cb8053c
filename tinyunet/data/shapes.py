"""A synthetic "pets" dataset made in memory: one textured shape per image on a textured background.

Labels follow the Oxford-IIIT Pet trimap: ``pet`` inside the shape, ``outline`` a band about 2.5 px
wide straddling its boundary, ``background`` elsewhere. Useful for lessons and tests: no download,
deterministic per seed, and a small U-Net learns it in about a minute on a CPU.

Every shape is *star-shaped* around its center, so it is described by a radius function r(theta):
a pixel at polar coordinates (rho, theta) is inside when rho < r(theta), and ``rho - r(theta)`` is
(close to) its distance from the boundary. That gives the outline band without any per-pixel loop.
"""
from __future__ import annotations

import numpy as np

from tinyunet.classes import CLASSES
from tinyunet.data.dataset import SegmentationData

__all__ = ["make_shapes"]

PET, BACKGROUND, OUTLINE = (c.id for c in CLASSES)
_ELLIPSE, _BLOB, _POLYGON = 0, 1, 2
_CHUNK = 256  # images per vectorized step: bounds memory at (256, S, S) float32 arrays
_HALF_BAND = 1.25  # outline = |rho - r| <= 1.25 px, i.e. a band ~2.5 px wide like the trimap's


def _uniform(rng: np.random.Generator, low, high, shape) -> np.ndarray:
    # float32 everywhere halves the time; a float64 parameter would silently promote whole images.
    return rng.uniform(low, high, shape).astype(np.float32)


def _radius(kind: np.ndarray, theta: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Boundary radius r(theta) in pixels for each image.

    Args:
        kind: (B,) shape kind per image (_ELLIPSE, _BLOB, _POLYGON).
        theta: (B, S, S) angle of each pixel around that image's center.
    Returns:
        (B, S, S) float32.
    """
    b = len(kind)
    r0 = _uniform(rng, 0.2, 0.34, (b, 1, 1)) * size
    phase = _uniform(rng, 0, 2 * np.pi, (b, 1, 1))
    # Ellipse: r = a*b / sqrt((b cos t)^2 + (a sin t)^2), with axis ratio up to 2:1.
    ratio = _uniform(rng, 0.5, 1.0, (b, 1, 1))
    t = theta - phase
    r_ellipse = r0 * ratio / np.sqrt((ratio * np.cos(t)) ** 2 + np.sin(t) ** 2)
    # Blob: a circle wobbled by three low harmonics (k = 2, 3, 4) with random amplitude and phase.
    k = np.arange(2, 5, dtype=np.float32).reshape(1, 3, 1, 1)
    amp = _uniform(rng, 0.0, 0.12, (b, 3, 1, 1))
    phi = _uniform(rng, 0, 2 * np.pi, (b, 3, 1, 1))
    r_blob = r0 * (1 + (amp * np.cos(k * theta[:, None] + phi)).sum(axis=1))
    # Regular polygon with n sides: r = R cos(pi/n) / cos((t mod 2pi/n) - pi/n).
    n = rng.integers(3, 7, (b, 1, 1)).astype(np.float32)
    sector = 2 * np.pi / n
    r_poly = r0 * 1.15 * np.cos(np.pi / n) / np.cos(np.mod(t, sector) - np.pi / n)
    kind = kind.reshape(b, 1, 1)
    return np.where(kind == _ELLIPSE, r_ellipse, np.where(kind == _BLOB, r_blob, r_poly))


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, b: int, freq: tuple[float, float]) -> np.ndarray:
    """Smooth random texture in [-1, 1]: the mean of 3 plane waves per image.

    Args:
        yy, xx: (1, S, S) pixel coordinates.
        freq: range of wave frequencies in cycles per pixel.
    Returns:
        (B, S, S) float32.
    """
    f = _uniform(rng, *freq, (b, 3, 1, 1)) * np.float32(2 * np.pi)
    angle = _uniform(rng, 0, np.pi, (b, 3, 1, 1))
    phase = _uniform(rng, 0, 2 * np.pi, (b, 3, 1, 1))
    proj = np.cos(angle) * xx[:, None] + np.sin(angle) * yy[:, None]
    return np.cos(f * proj + phase).mean(axis=1)


def _make_chunk(b: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Make ``b`` images and labels: uint8 (b, S, S, 3) and uint8 (b, S, S)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy, xx = yy[None], xx[None]
    center = _uniform(rng, 0.35, 0.65, (b, 2, 1, 1)) * size
    dy, dx = yy - center[:, 0], xx - center[:, 1]
    rho, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    kind = rng.integers(0, 3, b)
    dist = rho - _radius(kind, theta, rng, size)  # < 0 inside, ~pixels from the boundary

    labels = np.full((b, size, size), BACKGROUND, dtype=np.uint8)
    labels[dist < 0] = PET
    labels[np.abs(dist) <= _HALF_BAND] = OUTLINE

    # Pet: warm base color with fine stripes ("fur"); background: cooler, duller, coarse waves.
    # Colors overlap a little so the network must also use texture and shape, not one threshold.
    pet_base = _uniform(rng, [120, 60, 20], [250, 180, 120], (b, 3))
    bg_base = _uniform(rng, [30, 50, 60], [170, 180, 200], (b, 3))
    pet_tex = _texture(rng, yy, xx, b, (0.15, 0.3))[..., None] * _uniform(rng, 15, 45, (b, 1, 1, 1))
    bg_tex = _texture(rng, yy, xx, b, (0.01, 0.05))[..., None] * _uniform(rng, 20, 50, (b, 1, 1, 1))
    pet_rgb = pet_base[:, None, None, :] + pet_tex
    bg_rgb = bg_base[:, None, None, :] + bg_tex
    # Anti-aliased edge: blend over the one pixel the boundary crosses, like a real photo.
    alpha = np.clip(0.5 - dist, 0, 1)[..., None]
    rgb = alpha * pet_rgb + (1 - alpha) * bg_rgb + 8 * rng.standard_normal((b, size, size, 3), dtype=np.float32)
    images = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return images, labels


def make_shapes(num_images: int, size: int = 64, seed: int = 0) -> SegmentationData:
    """Make a synthetic segmentation dataset.

    Args:
        num_images: N, number of examples.
        size: S, side of the square images in pixels (>= 16 so the band is thinner than a shape).
        seed: the same (num_images, size, seed) always gives the same arrays.
    Returns:
        SegmentationData with images uint8 (N, S, S, 3), labels uint8 (N, S, S) in {pet, background,
        outline}, names ``"shapes_00000"`` ..., and no skipped examples.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    labels = np.empty((num_images, size, size), dtype=np.uint8)
    for start in range(0, num_images, _CHUNK):
        stop = min(start + _CHUNK, num_images)
        images[start:stop], labels[start:stop] = _make_chunk(stop - start, size, rng)
    names = [f"shapes_{i:05d}" for i in range(num_images)]
    return SegmentationData(images=images, labels=labels, names=names, skipped=[])
