"""The one place that chooses how the CPU acceleration computes a layer: every rule and threshold.

A layer of tinyunet/nn asks ``choose(layer, *inputs)`` first thing in its forward (through
``accelerated`` in nn/module.py). The answer is an implementation made for this layer and this input:
the layer runs its ``forward`` now and keeps it, so that backward runs its ``backward`` - what
forward chose, with the plan forward fixed. None means: run the reference (tinyunet/nn).

Every implementation computes the reference's numbers, up to the order of its sums, and declines
inputs it cannot take (``accepts``); tests/test_accel_*.py check each one against the reference on
inputs on both sides of every threshold below. The thresholds were measured on 2-core AMD EPYC
machines (Zen 4 and Zen 5); benchmarks/README.md has the numbers behind each.
"""
from __future__ import annotations

from typing import Any, Optional

from tinyunet.accel import compiled_loops, direct_kernels
from tinyunet.accel.concat import ChannelsLastConcat
from tinyunet.accel.conv import Im2colConv, Im2rowConv, output_size
from tinyunet.accel.direct import DirectConv
from tinyunet.accel.norm import CompiledBatchNorm, RowsBatchNorm
from tinyunet.accel.optim import ChunkedStep
from tinyunet.accel.parallel import get_num_threads, row_blocks
from tinyunet.accel.pool import SeparablePool
from tinyunet.accel.relu import BlockedReLU, CompiledReLU
from tinyunet.accel.shifted import ShiftedConv
from tinyunet.accel.upconv import RowsConvTranspose
from tinyunet.accel.winograd import WinogradConv

# --- Conv2d -------------------------------------------------------------------------------------
# Inputs of at most this many channels (an image) make every channels-last method move 12-byte pieces:
# the NCHW im2col (one product with K = 27 for RGB), or the direct kernels, which read it as it is.
IMAGE_CHANNELS = 4
# Winograd's F(2x2, 3x3) multiplies 16/36 as much, but its transforms move 4x the input and output
# through memory: it pays with many channels and enough 2x2 tiles. With the direct kernels running
# the shifted sums near the CPU's peak, only for the widest inputs (256 -> 128 channels at 16x16:
# Winograd 11.2 ms against the kernels' 11.7; 128 -> 128: 7.4 against 6.1, batch 8, Zen 5).
WINOGRAD_CHANNELS = 64                                   # in and out, with BLAS
WINOGRAD_CHANNELS_WITH_KERNELS = (256, 128)              # (in, out), with the direct kernels
WINOGRAD_TILES = 512
# The shifted BLAS products also compute the padding's rows, (Ho+kh-1)*(Wo+kw-1) rows for Ho*Wo
# pixels: 3% extra at 128x128, 56% at 8x8, where im2row's 9x copy is small. Outputs of at most this
# many pixels take im2row.
IM2ROW_PIXELS = 256
# With the direct kernels (which compute the real outputs only), only layers too small to share
# between threads take im2row: fewer multiply-adds than this.
IM2ROW_WORK_WITH_KERNELS = 2 ** 24
# A weight gradient over at least this many rows is split into partial sums over blocks of rows (the
# only way to parallelise a 16x16 result); fewer rows (deep layers, big weights): whole products,
# offsets or output channels shared out (partial sums would be a weight-sized array per block).
SPLIT_WEIGHT_GRAD_ROWS = 16384
# Shifted BLAS weight gradient with this many input channels: each pixel's row joined with its kw-1
# right neighbours (products of 8-16 input rows run far below BLAS speed; fewer, and the copy costs more).
JOINED_CHANNELS = (8, 16)
# BLAS adds the shifted products into the sum itself (beta = 1) from this many multiply-adds per
# product on; below, the microseconds of the call cost more than the pass over the output it saves.
BLAS_ADD_WORK = 2 ** 16


def conv2d(layer: Any, x: Any) -> Any:
    """im2col (an image's few channels), Winograd (many channels, enough tiles), im2row (strides,
    small outputs), else the shifted sums: on the direct kernels where they run, else by BLAS."""
    n, cin, cout = x.shape[0], layer.in_channels, layer.out_channels
    kh, kw = layer.kernel_size
    ho, wo = output_size(layer, x.shape[2], x.shape[3])
    kernels = DirectConv.accepts(layer, x)
    if cin <= IMAGE_CHANNELS:
        return direct_conv(layer, x) if kernels else Im2colConv(layer)
    fewest = WINOGRAD_CHANNELS_WITH_KERNELS if kernels else (WINOGRAD_CHANNELS, WINOGRAD_CHANNELS)
    if (WinogradConv.accepts(layer, x) and cin >= fewest[0] and cout >= fewest[1]
            and n * ho * wo // 4 >= WINOGRAD_TILES):
        return WinogradConv(layer)
    work = n * ho * wo * cin * cout * kh * kw
    if layer.stride != 1 or (work < IM2ROW_WORK_WITH_KERNELS if kernels else ho * wo <= IM2ROW_PIXELS):
        return Im2rowConv(layer)
    return direct_conv(layer, x) if kernels else shifted_conv(layer, x)


def direct_conv(layer: Any, x: Any) -> DirectConv:
    """The direct kernels' plan: partial sums of the weight gradient over blocks of rows where there
    are many rows; threads share out output channels where the weights outweigh the rows (forward, dx)."""
    n, _, h, w = x.shape
    kh, kw = layer.kernel_size
    ho, wo = output_size(layer, h, w)
    wide = -(-layer.in_channels // 16) * 16          # dx is computed on whole 16-channel vectors
    return DirectConv(layer, split_weight_grad=n * ho * wo >= SPLIT_WEIGHT_GRAD_ROWS,
                      share_channels=(n * ho * wo < kh * kw * layer.out_channels, n * h * w < kh * kw * wide))


def shifted_conv(layer: Any, x: Any) -> ShiftedConv:
    """The BLAS shifted products' plan (ShiftedConv's docstring)."""
    n, cin, h, w = x.shape
    kh, kw = layer.kernel_size
    p = layer.padding
    # the padded batch's rows whose whole window lies in it: the rows of every product
    rows = n * (h + 2 * p) * (w + 2 * p) - (kh - 1) * (w + 2 * p) - (kw - 1)
    smallest = min(stop - start for start, stop in row_blocks(rows, kh * kw * cin * layer.out_channels))
    return ShiftedConv(layer, split_weight_grad=rows >= SPLIT_WEIGHT_GRAD_ROWS,
                       join_rows=JOINED_CHANNELS[0] <= cin <= JOINED_CHANNELS[1],
                       blas_adds=smallest * cin * layer.out_channels >= BLAS_ADD_WORK)


def conv2d_candidates(layer: Any, x: Any) -> dict:
    """Every Conv2d implementation that takes this input, by name, each with the plan the chooser
    would give it (for benchmarks and tests that compare them)."""
    makers = {"im2col": Im2colConv, "im2row": Im2rowConv, "winograd": WinogradConv,
              "shifted": shifted_conv if ShiftedConv.accepts(layer, x) else None,
              "direct": direct_conv if DirectConv.accepts(layer, x) else None}
    return {name: make(layer, x) if name in ("shifted", "direct") else make(layer)
            for name, make in makers.items()
            if make is not None and (name != "winograd" or WinogradConv.accepts(layer, x))}


# --- the other layers ---------------------------------------------------------------------------
def batchnorm2d(layer: Any, x: Any) -> Any:
    """Compiled loops (Numba) or NumPy passes over image rows, for channels-last memory (what the
    accelerated convolutions hand over); NCHW memory: the reference."""
    if CompiledBatchNorm.accepts(layer, x):
        return CompiledBatchNorm(layer)
    return RowsBatchNorm(layer) if RowsBatchNorm.accepts(layer, x) else None


def relu(layer: Any, x: Any) -> Any:
    return CompiledReLU(layer) if CompiledReLU.accepts(layer, x) else BlockedReLU(layer)


def maxpool2d(layer: Any, x: Any) -> Any:
    return SeparablePool(layer) if SeparablePool.accepts(layer, x) else None


def conv_transpose2d(layer: Any, x: Any) -> Any:
    return RowsConvTranspose(layer)


def concat(layer: Any, *inputs: Any) -> Any:
    return ChannelsLastConcat(layer) if ChannelsLastConcat.accepts(layer, *inputs) else None


def optimizer(opt: Any) -> Any:
    return ChunkedStep(opt)


_CHOOSERS = {"Conv2d": conv2d, "BatchNorm2d": batchnorm2d, "ReLU": relu, "MaxPool2d": maxpool2d,
             "ConvTranspose2d": conv_transpose2d, "Concat": concat, "SGD": optimizer, "Adam": optimizer}


def choose(layer: Any, *inputs: Any) -> Optional[Any]:
    """An accelerated implementation of ``layer`` (a layer of tinyunet.nn, or an optimizer) for these
    inputs, or None (then the reference runs). Looked up by the class's name along its bases."""
    for cls in type(layer).__mro__:
        pick = _CHOOSERS.get(cls.__name__)
        if pick is not None and cls.__module__.startswith("tinyunet."):
            return pick(layer, *inputs)
    return None


def describe() -> str:
    """What the acceleration runs on this machine, in one line (for logs)."""
    compiled = compiled_loops.available()
    parts = [f"{get_num_threads()} threads",
             "Numba's compiled loops and direct convolution kernels" if compiled and direct_kernels.enabled()
             else "Numba's compiled loops" if compiled else "NumPy passes and BLAS (Numba not installed)"]
    return "CPU acceleration (tinyunet/accel): " + ", ".join(parts)
