"""Attention U-Net (Oktay et al., 2018): the U-Net whose skip connections pass through attention gates.

A plain U-Net hands the decoder every encoder feature of a level. An attention gate first weighs the
skip x (N, C, H, W) pixel by pixel with coefficients alpha in (0, 1), computed from x together with
a gating signal g: the decoder's coarser feature (N, Cg, H/2, W/2), which has seen more context and
"knows" where the object is. Additive attention, as in the paper:

    q     = ReLU(W_x(x) + W_g(g))          W_x: 2x2 conv, stride 2 (x down to g's size)   (N, Ci, H/2, W/2)
                                           W_g: 1x1 conv
    alpha = Upsample2x(sigmoid(psi(q)))    psi: 1x1 conv to one channel; bilinear x2      (N, 1, H, W)
    out   = x * alpha                      broadcast over the C channels                  (N, C, H, W)

Choices (the paper leaves room): x is brought down to g's resolution, as in the paper, rather than g
brought up to x's. The authors' code does that with a 2x2 stride-2 conv (a 1x1 stride-2 conv would
look at only one pixel in four), with Ci = C // 2, and resamples the coefficients bilinearly; so
does this one. Their extra output transform (a 1x1 conv + BN after the product) and the separate
gating conv on the bottleneck are left out: the gate here is exactly the formula above. g of the
deepest gate is the bottleneck's output; of the others, the previous decoder level's output.

Everything else is :class:`~tinyunet.models.unet.UNet`'s skeleton; AttentionUNet only overrides one
decoder step (:meth:`decode` and :meth:`decode_backward`) to gate the skip before the concat.
"""
from __future__ import annotations

from typing import Any, List, Tuple

from tinyunet.models.unet import UNet
from tinyunet.nn import Add, Conv2d, Module, Multiply, ReLU, Sigmoid, Upsample


class AttentionGate(Module):
    """forward(x, g): the skip x (N, skip_channels, H, W) weighed by coefficients computed from x and
    the gating signal g (N, gate_channels, H/2, W/2) -> (N, skip_channels, H, W)."""

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int) -> None:
        self.W_x = Conv2d(skip_channels, inter_channels, 2, stride=2, bias=False)  # W_g's bias serves both
        self.W_g = Conv2d(gate_channels, inter_channels, 1)
        self.add = Add()
        self.relu = ReLU()
        self.psi = Conv2d(inter_channels, 1, 1)
        self.sigmoid = Sigmoid()
        self.upsample = Upsample(2, mode="bilinear")
        self.multiply = Multiply()
        self.alpha: Any = None  # the coefficients of the last forward, (N, 1, H, W), for pictures

    def forward(self, x: Any, g: Any) -> Any:
        """x: (N, Cx, H, W), g: (N, Cg, H/2, W/2) -> x * alpha: (N, Cx, H, W)."""
        q = self.relu(self.add(self.W_x(x), self.W_g(g)))                # (N, Ci, H/2, W/2)
        self.alpha = self.upsample(self.sigmoid(self.psi(q)))            # (N, 1, H, W)
        return self.multiply(x, self.alpha)

    def backward(self, dout: Any) -> Tuple[Any, Any]:
        """dout: (N, Cx, H, W) -> (dx (N, Cx, H, W), dg (N, Cg, H/2, W/2))."""
        dx, dalpha = self.multiply.backward(dout)
        dq = self.psi.backward(self.sigmoid.backward(self.upsample.backward(dalpha)))
        d_wx, d_wg = self.add.backward(self.relu.backward(dq))
        # x fed both the product and W_x: its gradient is the sum of both paths
        return dx + self.W_x.backward(d_wx), self.W_g.backward(d_wg)

    def extra_repr(self) -> str:
        return "additive attention, alpha = upsample(sigmoid(psi(relu(W_x(x) + W_g(g)))))"


class AttentionUNet(UNet):
    """U-Net with an attention gate on every skip: same arguments, input and output as :class:`UNet`
    (``AttentionUNet(in_channels=3, num_classes=3, base_channels=16, depth=4, batchnorm=True)``).

    After a forward, :meth:`attention_maps` returns the gates' coefficients.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 3, base_channels: int = 16, depth: int = 4,
                 batchnorm: bool = True) -> None:
        super().__init__(in_channels, num_classes, base_channels, depth, batchnorm)
        widths = self.widths
        # in decoder order, like self.up: gate i sits on the skip of level depth-1-i, gated by width i+1's output
        self.gates = [AttentionGate(widths[level], widths[level + 1], max(widths[level] // 2, 1))
                      for level in reversed(range(depth))]

    def decode(self, i: int, x: Any, skip: Any) -> Any:
        """The U-Net's decoder step with the skip gated by x, the coarser decoder feature."""
        return super().decode(i, x, self.gates[i](skip, x))

    def decode_backward(self, i: int, dout: Any) -> Tuple[Any, Any]:
        """dout -> (dx, dskip) of :meth:`decode`, through the concat, then the gate."""
        d_x, d_gated = super().decode_backward(i, dout)
        d_skip, d_g = self.gates[i].backward(d_gated)
        # x fed both the up-convolution and the gate: its gradient is the sum of both paths
        return d_x + d_g, d_skip

    def attention_maps(self) -> List[Any]:
        """The coefficients of the last forward, one (N, 1, H_l, W_l) array per gate, values in (0, 1),
        in decoder order: the deepest (smallest) level first, full resolution last."""
        if any(gate.alpha is None for gate in self.gates):
            raise RuntimeError("no attention maps yet: run forward first")
        return [gate.alpha for gate in self.gates]
