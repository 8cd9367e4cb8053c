"""U-Net (Ronneberger et al., 2015), with padded convolutions so the output is the input's size.

    input (N, 3, H, W)
      encoder level l = 0..depth-1:  DoubleConv -> keep as skip_l -> MaxPool 2x2     (H/2^l)
      bottleneck:                    DoubleConv at H/2^depth, base * 2^depth channels
      decoder level l = depth-1..0:  ConvTranspose 2x2 stride 2 (doubles H, W; halves channels)
                                     -> Concat with skip_l -> DoubleConv
      head:                          1x1 Conv -> logits (N, num_classes, H, W)

Backward walks the same graph in reverse. The only new thing compared to a plain chain is the skip:
the gradient of skip_l arrives from two places (its pooled path and the concat) and the two add up.
"""
from __future__ import annotations

from typing import Any, List

from tinyunet.nn import BatchNorm2d, Concat, Conv2d, ConvTranspose2d, MaxPool2d, Module, ReLU, Sequential


def double_conv(in_channels: int, out_channels: int, batchnorm: bool = True) -> Sequential:
    """(3x3 conv -> [BN] -> ReLU) twice. With BN the conv bias is left out: BN's shift replaces it."""
    layers: List[Module] = []
    for cin in (in_channels, out_channels):
        layers.append(Conv2d(cin, out_channels, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(BatchNorm2d(out_channels))
        layers.append(ReLU())
    return Sequential(*layers)


def check_input_size(height: int, width: int, depth: int) -> None:
    """Each level halves H and W, and the decoder must get back to the skip's exact size."""
    factor = 2 ** depth
    if height % factor or width % factor:
        def near(v: int) -> str:
            lo = max(factor, v // factor * factor)
            return f"{lo} or {lo + factor}" if lo != v else str(v)
        raise ValueError(
            f"U-Net of depth {depth} needs height and width divisible by 2**{depth} = {factor}; "
            f"got {height}x{width}. Use e.g. {near(height)} for the height and {near(width)} for the width "
            f"(resize or pad the input)."
        )


class UNet(Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 3, base_channels: int = 16, depth: int = 4,
                 batchnorm: bool = True) -> None:
        self.depth = depth
        widths = [base_channels * 2 ** level for level in range(depth + 1)]  # e.g. 16, 32, 64, 128, 256
        self.down = [double_conv(cin, cout, batchnorm)
                     for cin, cout in zip([in_channels] + widths[:depth - 1], widths[:depth])]
        self.pool = [MaxPool2d(2) for _ in range(depth)]
        self.bottleneck = double_conv(widths[depth - 1], widths[depth], batchnorm)
        # decoder lists are in the order they run: deepest level first
        self.up = [ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2) for level in reversed(range(depth))]
        self.concat = [Concat(axis=1) for _ in range(depth)]
        self.up_conv = [double_conv(2 * widths[level], widths[level], batchnorm) for level in reversed(range(depth))]
        self.head = Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Any) -> Any:
        """x: (N, in_channels, H, W), H and W divisible by 2**depth -> logits (N, num_classes, H, W)."""
        check_input_size(x.shape[2], x.shape[3], self.depth)
        skips = []
        for block, pool in zip(self.down, self.pool):
            x = block(x)
            skips.append(x)
            x = pool(x)
        x = self.bottleneck(x)
        for up, concat, block, skip in zip(self.up, self.concat, self.up_conv, reversed(skips)):
            x = block(concat(up(x), skip))
        return self.head(x)

    def backward(self, dout: Any) -> Any:
        """dout: dlogits (N, num_classes, H, W) -> dx (N, in_channels, H, W)."""
        d = self.head.backward(dout)
        dskips = []
        for up, concat, block in zip(reversed(self.up), reversed(self.concat), reversed(self.up_conv)):
            d_up, d_skip = concat.backward(block.backward(d))
            dskips.append(d_skip)  # shallowest level first
            d = up.backward(d_up)
        d = self.bottleneck.backward(d)
        for block, pool, d_skip in zip(reversed(self.down), reversed(self.pool), reversed(dskips)):
            # skip_l fed both the pool and the concat: its gradient is the sum of both paths
            d = block.backward(pool.backward(d) + d_skip)
        return d
