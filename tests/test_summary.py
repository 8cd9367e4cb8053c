"""tinyunet summary: shapes, parameter counts and FLOPs against hand computations."""
import pytest

from tinyunet.accel import compiled_loops as kernels
from tinyunet.cli import main
from tinyunet.models import UNet
from tinyunet.nn import Conv2d, ConvTranspose2d, MaxPool2d, ReLU, Sequential
from tinyunet.summary import format_summary, summarize


def test_rows_match_hand_computation():
    model = Sequential(Conv2d(3, 4, 3, padding=1), ReLU(), MaxPool2d(2), ConvTranspose2d(4, 2, 2, stride=2))
    rows = summarize(model, (2, 3, 8, 8))
    assert [r.kind for r in rows] == ["Conv2d", "ReLU", "MaxPool2d", "ConvTranspose2d"]
    assert [r.output_shape for r in rows] == [(2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 4, 4), (2, 2, 8, 8)]
    assert [r.parameters for r in rows] == [4 * 3 * 9 + 4, 0, 0, 4 * 2 * 4 + 2]
    # conv: every output value is a 3*3*3 dot product; transposed conv: every input value paints 2*2*2
    assert rows[0].flops == 2 * (2 * 4 * 8 * 8) * (3 * 9)
    assert rows[3].flops == 2 * (2 * 4 * 4 * 4) * (2 * 4)
    assert rows[1].flops == rows[2].flops == 0
    # every layer here keeps something for its backward pass
    assert all(r.saved_bytes > 0 for r in rows)


def test_unet_totals_and_cleanup():
    model = UNet(base_channels=4, depth=2)
    rows = summarize(model, (1, 3, 16, 16))
    assert sum(r.parameters for r in rows) == model.num_parameters()
    assert rows[-1].output_shape == (1, 3, 16, 16)
    text = format_summary(rows)
    assert "total" in text and "GFLOP" in text
    # the forward run by the summary must not leave per-layer forward overrides behind
    assert all("forward" not in vars(m) for m in model.modules())


def test_unet_rows_follow_the_forward_pass():
    """Rows in the order data flows: each encoder block and its pool, the bottleneck, then per level
    up-convolution, concat and decoder block, the head last (not the registration order)."""
    rows = summarize(UNet(base_channels=4, depth=2), (1, 3, 16, 16))
    blocks = []
    for r in rows:
        block = r.name.rsplit(".", 1)[0] if r.name.startswith(("down.", "up_conv.", "bottleneck")) else r.name
        if not blocks or blocks[-1] != block:
            blocks.append(block)
    assert blocks == ["down.0", "pool.0", "down.1", "pool.1", "bottleneck", "up.0", "concat.0", "up_conv.0",
                      "up.1", "concat.1", "up_conv.1", "head"]


def test_cli_summary(capsys):
    assert main(["summary", "--size", "32", "--batch-size", "2", "--base-channels", "4", "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "head" in out and "(2, 3, 32, 32)" in out


@pytest.mark.parametrize("direct", [False, True])
def test_implementation_column_follows_the_choosers_rules(direct):
    """Standard configuration. BLAS products (no Numba, or the compiled code off): the RGB layer
    im2col, 16-32 channels the shifted products, 64-128 channels at 16x16-32x32 Winograd, the 8x8
    bottleneck (128 tiles) im2row: of the 19 convolutions 1 im2col, 9 shifted, 7 Winograd, 2 im2row.
    With the direct kernels they also take the RGB layer, the 64- and 128-channel layers and the 8x8
    bottleneck, Winograd only 256 input channels at 16x16: 17 direct, 1 Winograd, and the 1x1 head
    (3 output channels, not a multiple of the kernels' 16) shifted by BLAS."""
    if direct:
        pytest.importorskip("numba")
    previous = kernels.set_enabled(direct)
    try:
        rows = {r.name: r for r in summarize(UNet(base_channels=16, depth=4), (8, 3, 128, 128))}
    finally:
        kernels.set_enabled(previous)
    impl = {name: r.implementation for name, r in rows.items()}
    shifted = "direct" if direct else "shifted"
    assert impl["down.0.0"] == ("direct" if direct else "im2col")
    assert impl["down.0.3"] == impl["down.1.3"] == impl["up_conv.3.0"] == shifted
    assert impl["up_conv.0.0"] == "winograd"                                        # 256 -> 128 at 16x16
    assert impl["up_conv.0.3"] == impl["down.3.3"] == ("direct" if direct else "winograd")   # 128 -> 128
    assert impl["bottleneck.0"] == impl["bottleneck.3"] == (shifted if direct else "im2row")  # 8x8
    sixty_four = (impl["down.2.3"], impl["up_conv.1.3"], impl["down.3.0"])  # 64->64 at 32x32, 64->128 at 16x16
    assert sixty_four == ((shifted,) * 3 if direct else ("winograd",) * 3)
    convs = [r.implementation for r in rows.values() if r.kind == "Conv2d"]
    counts = {name: convs.count(name) for name in set(convs)}
    assert counts == ({"direct": 17, "winograd": 1, "shifted": 1} if direct else
                      {"im2col": 1, "shifted": 9, "winograd": 7, "im2row": 2})
    assert impl["down.0.1"] == ("compiled" if direct else "rows") and impl["up.0"] == "rows"
    assert impl["pool.0"] == "separable" and impl["concat.0"] == "channels-last"
    assert "winograd" in format_summary(list(rows.values()))


def test_without_the_acceleration_every_layer_is_the_reference(reference_only):
    rows = summarize(UNet(base_channels=4, depth=2), (2, 3, 32, 32))
    assert {r.implementation for r in rows} == {"reference"}
    assert "reference" in format_summary(rows)


def test_a_view_of_a_kept_array_is_charged_once():
    """Saved memory counts bytes, not arrays: a module keeping an array and a view of it holds the array's
    400 bytes (10 x 10 float32), once."""
    import numpy as np

    from tinyunet.nn import Module
    from tinyunet.summary import saved_bytes

    module = Module()
    whole = np.zeros((10, 10), np.float32)
    module.whole, module.part = whole, whole[2:5]
    assert saved_bytes(module) == 400
