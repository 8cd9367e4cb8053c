"""ResUNet: the U-Net skeleton with residual blocks (He et al., 2016) in place of the double convs.

Every level's block becomes

    x ──> conv3x3 -> BN -> ReLU -> conv3x3 -> BN ──> (+) -> ReLU -> out
    └───────────── shortcut ──────────────────────────┘

where the shortcut is x itself when the channel count stays the same, and a 1x1 conv (+ BN) that
projects x to the new channel count where it changes (in this skeleton: every block). The block
then only has to learn a *correction* to its input, and in backward the addition hands the full
gradient to the shortcut: it reaches the block's input through at most one 1x1 conv, not two 3x3s.

Everything else (pooling, up-convolutions, skips, head) is :class:`~tinyunet.models.unet.UNet`'s:
ResUNet only overrides :meth:`~tinyunet.models.unet.UNet.make_block`.
"""
from __future__ import annotations

from typing import Any, List, Optional

from tinyunet.models.unet import UNet
from tinyunet.nn import Add, BatchNorm2d, Conv2d, Module, ReLU, Sequential


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, batchnorm: bool) -> List[Module]:
    """A same-size conv, followed by BN if ``batchnorm`` (then the conv has no bias: BN's shift replaces it)."""
    conv = Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not batchnorm)
    return [conv, BatchNorm2d(out_channels)] if batchnorm else [conv]


class ResidualBlock(Module):
    """(N, in_channels, H, W) -> (N, out_channels, H, W): relu(branch(x) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int, batchnorm: bool = True) -> None:
        self.branch = Sequential(*conv_bn(in_channels, out_channels, 3, batchnorm), ReLU(),
                                 *conv_bn(out_channels, out_channels, 3, batchnorm))
        # None means identity: nothing to learn when the shapes already match
        self.shortcut: Optional[Sequential] = (
            Sequential(*conv_bn(in_channels, out_channels, 1, batchnorm)) if in_channels != out_channels else None)
        self.add = Add()
        self.relu = ReLU()

    def forward(self, x: Any) -> Any:
        """x: (N, in_channels, H, W) -> (N, out_channels, H, W)."""
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.add(self.branch(x), shortcut))

    def backward(self, dout: Any) -> Any:
        """dout: (N, out_channels, H, W) -> dx: (N, in_channels, H, W)."""
        d_branch, d_shortcut = self.add.backward(self.relu.backward(dout))
        if self.shortcut is not None:
            d_shortcut = self.shortcut.backward(d_shortcut)
        d_x = self.branch.backward(d_branch)
        if d_x is None:  # the block reads the model's input, whose gradient was not asked for
            return None
        # x fed both paths: its gradient is the sum of both
        return d_x + d_shortcut


class ResUNet(UNet):
    """U-Net with residual blocks: same arguments, input and output as :class:`UNet`
    (``ResUNet(in_channels=3, num_classes=3, base_channels=16, depth=4, batchnorm=True)``)."""

    def input_layers(self) -> List[Module]:
        first = self.down[0]
        return [first.branch[0]] + ([first.shortcut[0]] if first.shortcut is not None else [])

    def make_block(self, in_channels: int, out_channels: int, batchnorm: bool) -> Module:
        return ResidualBlock(in_channels, out_channels, batchnorm)
