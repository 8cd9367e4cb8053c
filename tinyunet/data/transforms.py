"""Image and mask transforms on the host (NumPy + Pillow): resize, normalize, augment.

Photos and masks need different resampling: a photo is resized bilinearly (smooth colors), a mask
with nearest neighbour, because averaging class ids 0 and 2 would invent a class 1 on the border.

Augmentation (:func:`augment`) works on a whole uint8 batch at once: a random flip, scale, crop and
rotation per example, folded into ONE affine map from output pixels to source positions, so each
photo is resampled once (bilinear) and its mask once at exactly the same positions (nearest);
then brightness, contrast and saturation jitter on the photos only. Positions that fall outside the
image (a rotated window's corners) are mirrored back inside, for the photo and its mask alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["MEAN", "STD", "to_input", "resize_image", "resize_mask", "resize_probabilities", "hflip",
           "Augmentation", "augment", "warp", "jitter_colors"]

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


def resize_probabilities(probs: np.ndarray, height: int, width: int, top: int = 0,
                         bottom: int | None = None) -> np.ndarray:
    """(C, h, w) float -> rows [top, bottom) (default: all) of the (C, height, width) bilinear resize,
    float32, per class (host, at the edge).

    Class probabilities, not class ids, are resized: the most probable class of the resized maps
    gives smooth borders at the photo's own size, where resized ids would be blocky. A band of rows is
    exactly those rows of the whole resize (Pillow places output row r at input row
    (r + 0.5) * h / height - 0.5 whether it resizes the whole or a box of it), so a large photo can be
    resized band by band.
    """
    bottom = height if bottom is None else bottom
    h, w = probs.shape[1:]
    box = (0.0, top * h / height, float(w), bottom * h / height)
    return np.stack([np.asarray(Image.fromarray(p.astype(np.float32), mode="F")
                                .resize((width, bottom - top), Image.BILINEAR, box=box)) for p in probs])


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


@dataclass(frozen=True)
class Augmentation:
    """Which random transforms :func:`augment` applies; each is off at its neutral value.

    Attributes:
        flip: mirror left-right with probability 1/2.
        scale: smallest share of the image's AREA a random square crop keeps (uniform in
            [scale, 1]), stretched back to the full size; 1 = no crop.
        rotate: largest rotation in degrees, either way (uniform); 0 = none.
        brightness: photo times a factor uniform in [1 - b, 1 + b]; 0 = none.
        contrast: photo blended with its mean gray, factor uniform in [1 - c, 1 + c]; 0 = none.
        saturation: each pixel blended with its own gray, factor uniform in [1 - s, 1 + s]; 0 = none.
    """

    flip: bool = True
    scale: float = 1.0
    rotate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"scale (the smallest crop's share of the area) must be in (0, 1], got {self.scale}")
        if not 0.0 <= self.rotate <= 180.0:
            raise ValueError(f"rotate (degrees) must be in [0, 180], got {self.rotate}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def geometric(self) -> bool:
        """Does a photo need resampling (crop or rotation), beyond a flip?"""
        return self.scale < 1.0 or self.rotate > 0.0

    @property
    def color(self) -> bool:
        return self.brightness > 0 or self.contrast > 0 or self.saturation > 0


def _mirror(position: np.ndarray, n: int) -> np.ndarray:
    """Positions (pixel centres at 0 .. n-1) mirrored into [0, n-1] at the edge pixels' centres
    (..., 2, 1, 0, 1, 2, ..., n-1, n-2, ...): one reflection, enough for anything a window inside the
    image reaches when rotated (at most 0.21 sides beyond an edge); farther positions end at the edge.
    Bilinear reads of the mirrored positions equal reads of the mirrored image: it is symmetric about
    those centres."""
    if position.min() >= 0 and position.max() <= n - 1:  # the usual case: no pass over the array
        return position
    position = np.abs(position)
    return np.maximum(np.minimum(position, 2 * (n - 1) - position), 0, out=position)


def warp(images: np.ndarray, masks: np.ndarray, flip: np.ndarray, side: np.ndarray, angle: np.ndarray,
         center_x: np.ndarray, center_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut a rotated square window out of each square image and stretch it to the full size.

    Output pixel (i, j) of example k shows the source position

        center_k + side_k * R(angle_k) @ (±u_j, v_i),   u_j = (j + 0.5) / W - 0.5,  v_i = (i + 0.5) / H - 0.5

    in units of the image side (minus u where ``flip``), read bilinearly from the photo and by
    nearest neighbour from the mask; positions outside the image are mirrored back in.
    ``side = 1, angle = 0, center = 0.5`` gives every pixel back unchanged.

    Args:
        images: uint8 (N, H, W, 3), H and W at least 2. masks: (N, H, W).
        flip: bool (N,). side: (N,) window side as a share of the image side. angle: (N,) radians.
        center_x, center_y: (N,) window centre as a share of the width / height.
    Returns:
        (float32 (N, H, W, 3) photos, masks of the input dtype).
    """
    n, h, w = masks.shape
    col = (np.arange(w) + 0.5) / w - 0.5
    u = np.where(flip[:, None], -col, col)[:, None, :]  # (N, 1, W)
    v = ((np.arange(h) + 0.5) / h - 0.5)[None, :, None]  # (1, H, 1)
    cos, sin, side = (a.reshape(-1, 1, 1) for a in (np.cos(angle), np.sin(angle), side))
    # source positions in pixel units, pixel centres at integers (N, H, W)
    sx = _mirror((center_x.reshape(-1, 1, 1) + side * (cos * u - sin * v)) * w - 0.5, w)
    sy = _mirror((center_y.reshape(-1, 1, 1) + side * (sin * u + cos * v)) * h - 0.5, h)
    first = (np.arange(n) * (h * w)).reshape(-1, 1, 1)  # flat index of each example's pixel (0, 0)

    new_masks = np.take(masks.reshape(-1), first + np.rint(sy).astype(np.intp) * w + np.rint(sx).astype(np.intp))
    # the top-left of the 4 neighbours; at the last row/column, its left/upper neighbour with weight 1
    x0, y0 = np.minimum(np.floor(sx), w - 2), np.minimum(np.floor(sy), h - 2)
    wx, wy = (sx - x0).astype(np.float32)[..., None], (sy - y0).astype(np.float32)[..., None]
    i00 = first + y0.astype(np.intp) * w + x0.astype(np.intp)
    pixels = images.reshape(-1, 3)

    def read(index: np.ndarray) -> np.ndarray:  # np.take: ~5x faster than pixels[index] for rows
        return np.take(pixels, index, axis=0)

    top = read(i00) * (1 - wx) + read(i00 + 1) * wx
    bottom = read(i00 + w) * (1 - wx) + read(i00 + w + 1) * wx
    return top * (1 - wy) + bottom * wy, new_masks


#: ITU-R 601 luma weights: the gray a photo's colors are blended with (as in Pillow and torchvision).
GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _gray(x: np.ndarray) -> np.ndarray:
    return x[..., 0] * GRAY[0] + x[..., 1] * GRAY[1] + x[..., 2] * GRAY[2]


def jitter_colors(images: np.ndarray, brightness: np.ndarray | None, contrast: np.ndarray | None,
                  saturation: np.ndarray | None) -> np.ndarray:
    """Brightness, contrast and saturation changes of a batch of photos, each factor per example.

    brightness: x * b; contrast: m + c * (x - m) with m the photo's mean gray; saturation:
    g + s * (x - g) with g each pixel's gray. A factor of 1 (or None) changes nothing.

    Args:
        images: float32 or uint8 (N, H, W, 3) on the 0..255 scale; factors: (N,) or None.
    Returns:
        float32 (N, H, W, 3), clipped to [0, 255] once at the end.
    """
    x = images.astype(np.float32)  # a copy: the caller's array is never changed
    if brightness is not None:
        x *= brightness.astype(np.float32).reshape(-1, 1, 1, 1)
    if contrast is not None:
        mean = _gray(x).mean(axis=(1, 2)).reshape(-1, 1, 1, 1)
        x = mean + contrast.astype(np.float32).reshape(-1, 1, 1, 1) * (x - mean)
    if saturation is not None:
        gray = _gray(x)[..., None]
        x = gray + saturation.astype(np.float32).reshape(-1, 1, 1, 1) * (x - gray)
    return np.clip(x, 0, 255, out=x)


def augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
            settings: Augmentation = Augmentation(), part: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """Random transforms of a batch, independently per example; masks move with their photos.

    The random numbers are drawn per batch in a fixed order (flips; window side, angle, centre;
    brightness, contrast, saturation), each only when its transform is on: so the same rng state
    gives the same batch, and flips alone draw exactly what they always did (``rng.random(N) < 0.5``).

    Args:
        images: uint8 (N, H, W, 3), square. masks: (N, H, W).
        rng: source of randomness (the training loop's per-(seed, epoch) generator).
        settings: which transforms, how strong (default: left-right flips only).
        part: the examples to transform and return, e.g. one process's shard of a global batch: the
            random numbers are drawn for the whole batch all the same, so each example is transformed
            exactly as in the whole batch.
    Returns:
        (uint8 images, masks) new arrays of the shapes and dtypes of ``images[part]``, ``masks[part]``.
    """
    n = len(images)
    flip = rng.random(n) < 0.5 if settings.flip else np.zeros(n, dtype=bool)
    images, masks, flip = images[part], masks[part], flip[part]
    if settings.geometric:
        # the window's side: a uniform share of the AREA, so small and large crops are equally likely per area
        side = np.sqrt(rng.uniform(settings.scale, 1.0, n)) if settings.scale < 1 else np.ones(n)
        angle = np.deg2rad(rng.uniform(-settings.rotate, settings.rotate, n)) if settings.rotate > 0 else np.zeros(n)
        # the centre anywhere the (unrotated) window stays inside the image
        center = rng.uniform(side / 2, 1 - side / 2, (2, n)) if settings.scale < 1 else np.full((2, n), 0.5)
        photos, masks = warp(images, masks, flip, side[part], angle[part], center[0][part], center[1][part])
    else:
        photos, masks = images.copy(), masks.copy()
        # Fancy indexing with a boolean mask flips the chosen examples in one vectorized step.
        photos[flip] = photos[flip][:, :, ::-1]
        masks[flip] = masks[flip][:, :, ::-1]
    if settings.color:
        factors = [rng.uniform(1 - f, 1 + f, n)[part] if f > 0 else None
                   for f in (settings.brightness, settings.contrast, settings.saturation)]
        photos = jitter_colors(photos, *factors)
    if photos.dtype != np.uint8:
        photos = np.rint(photos).astype(np.uint8)  # in range: bilinear mixes and the jitter's clip keep 0..255
    return photos, masks
