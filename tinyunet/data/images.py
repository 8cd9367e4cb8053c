"""Reading a photo as the picture a person sees in an image viewer, whatever its file holds.

One reader for training, evaluation and prediction alike (:func:`open_photo`, :func:`read_photo`):

- **orientation**: a phone photo's pixels are stored as the sensor saw them, with an EXIF tag that
  tells viewers to turn them; the tag is applied (then the pet is upright and masks and overlays
  line up with the photo a viewer shows);
- **high bit depths**: 16-bit (and 32-bit integer) grayscale is scaled from 0-65535 to 0-255 (its
  top 8 bits, as Pillow reads 16-bit colour PNGs), 32-bit float from 0-1;
- **transparency** (an alpha channel, or a transparent palette entry or colour) is flattened on
  :data:`BACKGROUND`, white, as most viewers show it;
- **animations** (GIF, APNG, WebP): the first frame, with a note;
- every other mode (grayscale, palette, CMYK, YCbCr, LAB, 1-bit) is converted to RGB by Pillow.

What Pillow refuses (not an image, truncated, too large: its decompression-bomb limit) or warns
about while decoding (a warning means it is not sure of the picture either) is an
:class:`UnreadableImage` error that names the file and the reason; the callers skip and list such
files, or stop at the first with ``--strict`` (a single file given to predict: its error).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from tinyunet.errors import DataError

__all__ = ["BACKGROUND", "UnreadableImage", "open_photo", "read_photo"]

#: The colour transparent pixels are flattened on (RGB).
BACKGROUND: Tuple[int, int, int] = (255, 255, 255)

_ORIENTATION = 0x0112  # the EXIF tag: 1 = as stored, 2-8 = mirror and/or turn
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_TRANSPARENT = ("RGBA", "LA", "PA", "RGBa")


class UnreadableImage(DataError):
    """A photo Pillow refuses or doubts: "cannot read image <path>: <reason>"."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = path, reason


def _as_viewed(im: Image.Image) -> Image.Image:
    """The loaded image ``im`` as an RGB image, turned, scaled and flattened as described above."""
    if im.getexif().get(_ORIENTATION, 1) in range(2, 9):
        im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT:
        values = np.asarray(im)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        values = np.asarray(im)
        return Image.fromarray(np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)).convert("RGB")
    if im.mode in _TRANSPARENT or "transparency" in im.info:
        rgba = im.convert("RGBA")  # a palette's or a colour's transparency becomes an alpha channel
        flat = Image.new("RGB", im.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))  # colour * alpha + background * (1 - alpha)
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")


def open_photo(path: str | os.PathLike) -> Tuple[Image.Image, Optional[str]]:
    """``(image, note)``: the photo at ``path`` as a decoded RGB Pillow image in the orientation a
    viewer shows, and a note for the user ("an animation of 3 frames: read its first") or None.
    (Pillow keeps RGB in 4 bytes a pixel: a 24-megapixel photo is 96 MB, its array 72 MB more.)

    Raises:
        UnreadableImage (a DataError): "cannot read image <path>: <reason>", for whatever Pillow
        refuses or warns about.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
                im.load()  # decode now (the first frame): a truncated file fails here
                image = _as_viewed(im)
    except Exception as exc:  # Pillow's refusals come as OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UnreadableImage(path, str(exc) or type(exc).__name__) from None
    doubts = [str(w.message) for w in caught if issubclass(w.category, (UserWarning, RuntimeWarning))]
    if doubts:
        raise UnreadableImage(path, f"Pillow warns: {doubts[0]}")
    return image, (f"an animation of {frames} frames: read its first" if frames > 1 else None)


def read_photo(path: str | os.PathLike) -> Tuple[np.ndarray, Optional[str]]:
    """``(image, note)`` of :func:`open_photo`, the image as uint8 (H, W, 3) RGB."""
    image, note = open_photo(path)
    return np.asarray(image), note
