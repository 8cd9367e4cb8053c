"""Models assembled from tinyunet.nn layers."""
from tinyunet.models.unet import UNet

__all__ = ["UNet"]
