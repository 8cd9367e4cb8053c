"""Models assembled from tinyunet.nn layers, and a factory that builds one by name."""
from typing import Any

from tinyunet.errors import TinyUNetError
from tinyunet.models.attention_unet import AttentionUNet
from tinyunet.models.resunet import ResUNet
from tinyunet.models.unet import UNet
from tinyunet.nn import Module

ARCHITECTURES = {"unet": UNet, "resunet": ResUNet, "attunet": AttentionUNet}


def create_model(arch: str = "unet", **kwargs: Any) -> Module:
    """Build the architecture ``arch`` (see ``ARCHITECTURES``) with its constructor's keyword arguments."""
    if arch not in ARCHITECTURES:
        raise TinyUNetError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


__all__ = ["UNet", "ResUNet", "AttentionUNet", "create_model", "ARCHITECTURES"]
