"""Image and mask transforms on the host (NumPy + Pillow): resize, normalize, flip.

Photos and masks need different resampling: a photo is resized bilinearly (smooth colors), a mask
with nearest neighbour, because averaging class ids 0 and 2 would invent a class 1 on the border.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["MEAN", "STD", "to_input", "resize_image", "resize_mask", "hflip", "augment"]

#: Per-channel RGB mean and std of ImageNet, on the [0, 1] scale (the usual choice for photos).
MEAN: np.ndarray = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD: np.ndarray = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def to_input(images: np.ndarray) -> np.ndarray:
    """Turn uint8 photos into a normalized float32 network input.

    Args:
        images: uint8 (N, H, W, 3), RGB.
    Returns:
        float32 (N, 3, H, W): ``(images / 255 - MEAN) / STD`` per channel, NCHW.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    x = images.astype(np.float32) * np.float32(1 / 255)
    x = (x - MEAN) / STD  # broadcasts over the last (channel) axis
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _to_pil(img: Image.Image | np.ndarray) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))


def resize_image(img: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resize a photo to ``size x size`` with bilinear interpolation.

    The aspect ratio is NOT kept: a 256x171 photo is stretched to a square, as the published
    U-Net baselines on Oxford-IIIT Pet do; the mask is stretched the same way, so labels still match.

    Args:
        img: PIL image or uint8 array (H, W, 3).
    Returns:
        uint8 (size, size, 3) if the input is RGB.
    """
    return np.asarray(_to_pil(img).resize((size, size), Image.BILINEAR))


def resize_mask(mask: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resize a trimap or label map to ``size x size`` with nearest neighbour (no invented values).

    Args:
        mask: PIL image or uint8 array (H, W).
    Returns:
        uint8 (size, size).
    """
    return np.asarray(_to_pil(mask).resize((size, size), Image.NEAREST))


def hflip(images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a batch left-right, photos and masks together.

    Width is axis 2 in both layouts, so the same slice flips both.

    Args:
        images: (N, H, W, 3) photos, NHWC as stored in :class:`SegmentationData`.
        masks: (N, H, W).
    Returns:
        (flipped images, flipped masks), new arrays.
    """
    return images[:, :, ::-1].copy(), masks[:, :, ::-1].copy()


def augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal flip, independently per example (probability 1/2).

    Left-right mirroring is the one augmentation that never changes what a pet looks like.

    Args:
        images: uint8 (N, H, W, 3).
        masks: (N, H, W).
        rng: source of randomness; the same rng state gives the same flips.
    Returns:
        (images, masks) new arrays of the same shapes.
    """
    flip = rng.random(len(images)) < 0.5
    images = images.copy()
    masks = masks.copy()
    # Fancy indexing with a boolean mask flips the chosen examples in one vectorized step.
    images[flip] = images[flip][:, :, ::-1]
    masks[flip] = masks[flip][:, :, ::-1]
    return images, masks
