"""U-Net (Ronneberger et al., 2015), with padded convolutions so the output is the input's size.

    input (N, 3, H, W)
      encoder level l = 0..depth-1:  DoubleConv -> keep as skip_l -> MaxPool 2x2     (H/2^l)
      bottleneck:                    DoubleConv at H/2^depth, base * 2^depth channels
      decoder level l = depth-1..0:  ConvTranspose 2x2 stride 2 (doubles H, W; halves channels)
                                     -> Concat with skip_l -> DoubleConv
      head:                          1x1 Conv -> logits (N, num_classes, H, W)

Backward walks the same graph in reverse. The only new thing compared to a plain chain is the skip:
the gradient of skip_l arrives from two places (its pooled path and the concat) and the two add up.

The variants reuse this skeleton by overriding one piece each: :meth:`UNet.make_block` (ResUNet puts
a residual block where the double conv is) and :meth:`UNet.decode` / :meth:`UNet.decode_backward`,
one decoder level (Attention U-Net gates the skip before the concat).
"""
from __future__ import annotations

from typing import Any, List, Tuple

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
        self.widths = widths = [base_channels * 2 ** level for level in range(depth + 1)]  # e.g. 16, ..., 256
        self.down = [self.make_block(cin, cout, batchnorm)
                     for cin, cout in zip([in_channels] + widths[:depth - 1], widths[:depth])]
        self.pool = [MaxPool2d(2) for _ in range(depth)]
        self.bottleneck = self.make_block(widths[depth - 1], widths[depth], batchnorm)
        # decoder lists are in the order they run: deepest level first
        self.up = [ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2) for level in reversed(range(depth))]
        self.concat = [Concat(axis=1) for _ in range(depth)]
        self.up_conv = [self.make_block(2 * widths[level], widths[level], batchnorm)
                        for level in reversed(range(depth))]
        self.head = Conv2d(widths[0], num_classes, 1)

    def make_block(self, in_channels: int, out_channels: int, batchnorm: bool) -> Module:
        """The block of every level, (N, in_channels, H, W) -> (N, out_channels, H, W): a double conv."""
        return double_conv(in_channels, out_channels, batchnorm)

    def forward(self, x: Any) -> Any:
        """x: (N, in_channels, H, W), H and W divisible by 2**depth -> logits (N, num_classes, H, W)."""
        check_input_size(x.shape[2], x.shape[3], self.depth)
        skips = []
        for block, pool in zip(self.down, self.pool):
            x = block(x)
            skips.append(x)
            x = pool(x)
        x = self.bottleneck(x)
        for i, skip in enumerate(reversed(skips)):
            x = self.decode(i, x, skip)
        return self.head(x)

    def input_layers(self) -> List[Module]:
        """The layers that read the input image itself: the first block's first conv."""
        return [self.down[0][0]]

    def backward(self, dout: Any, input_grad: bool = True) -> Any:
        """dout: dlogits (N, num_classes, H, W) -> dx (N, in_channels, H, W).

        ``input_grad=False`` (training) skips the gradient of the input image and returns None: only
        the parameters' gradients matter there, and the first conv's input gradient is ~1% of a step.
        """
        for layer in self.input_layers():
            layer.input_grad = input_grad
        d = self.head.backward(dout)
        dskips = []
        for i in reversed(range(self.depth)):
            d, d_skip = self.decode_backward(i, d)
            dskips.append(d_skip)  # shallowest level first
        d = self.bottleneck.backward(d)
        for block, pool, d_skip in zip(reversed(self.down), reversed(self.pool), reversed(dskips)):
            # skip_l fed both the pool and the concat: its gradient is the sum of both paths
            d = block.backward(pool.backward(d) + d_skip)
        return d

    def decode(self, i: int, x: Any, skip: Any) -> Any:
        """Decoder step i (0 = deepest): x (N, 2C, h, w) from the level below, skip (N, C, 2h, 2w)
        -> up-convolve x, concat with the skip, block -> (N, C, 2h, 2w)."""
        return self.up_conv[i](self.concat[i](self.up[i](x), skip))

    def decode_backward(self, i: int, dout: Any) -> Tuple[Any, Any]:
        """dout: (N, C, 2h, 2w) -> (dx (N, 2C, h, w), dskip (N, C, 2h, 2w)) of :meth:`decode`."""
        d_up, d_skip = self.concat[i].backward(self.up_conv[i].backward(dout))
        return self.up[i].backward(d_up), d_skip
