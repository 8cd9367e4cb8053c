"""Make every figure of the lessons: ``python lessons/make_figures.py`` (from the repository root).

    python lessons/make_figures.py              all figures (about two minutes on 2 CPU cores)
    python lessons/make_figures.py pooling ...  only the named ones (see FIGURES at the bottom)

Each figure is a small PNG in lessons/figures/ (kept under 150 KB; palette-compressed when that is
lossless enough). Everything is seeded, so a rerun draws the same pictures. The pets figure needs the
Oxford-IIIT Pet folder: $TINYUNET_DATA, else ../shared/data/oxford-iiit-pet from the repository root.
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "lessons" / "figures"
sys.path.insert(0, str(REPO))

from tinyunet import backend  # noqa: E402

backend.use("numpy")

BLUE, ORANGE, GREEN, RED, GREY = "#3b6fb6", "#e8892b", "#4a9a5b", "#c44e52", "#bbbbbb"


def save(fig: Figure, name: str, dpi: int = 100) -> Path:
    """Save as PNG; re-encode with a 256-colour palette when that makes the file smaller."""
    OUT.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white", bbox_inches="tight", pad_inches=0.15)
    raw = buf.getvalue()
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    small = io.BytesIO()
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(small, format="png", optimize=True)
    data = small.getvalue() if len(small.getvalue()) < len(raw) else raw
    path = OUT / f"{name}.png"
    path.write_bytes(data)
    print(f"{path.relative_to(REPO)}: {image.width}x{image.height}, {len(data) / 1024:.0f} KB")
    return path


def grid(ax, values, colors=None, fmt="{:g}", origin=(0, 0), fontsize=10, edge="black", text_color="black"):
    """Draw a 2-d array as labelled squares with its top-left corner at ``origin`` (x, y), y down."""
    values = np.asarray(values)
    ox, oy = origin
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            face = "white" if colors is None else colors[r][c]
            ax.add_patch(Rectangle((ox + c, oy + r), 1, 1, facecolor=face, edgecolor=edge, lw=0.8))
            if fmt:
                ax.text(ox + c + 0.5, oy + r + 0.5, fmt.format(values[r, c]), ha="center", va="center",
                        fontsize=fontsize, color=text_color)


def blank(ax, xlim, ylim):
    ax.set_xlim(*xlim)
    ax.set_ylim(ylim[1], ylim[0])  # y grows downwards, like array rows
    ax.set_aspect("equal")
    ax.axis("off")


# --- lesson 03 ---------------------------------------------------------------------------------------

def conv_sliding() -> None:
    """A 3x3 kernel sliding over a padded 5x5 input (stride 1): two positions and their outputs."""
    fig = Figure(figsize=(11, 3.2))
    axes = fig.subplots(1, 2)
    for ax, (oy, ox), color in zip(axes, [(0, 0), (2, 3)], [ORANGE, BLUE]):
        colors = [[GREY if (r in (0, 6) or c in (0, 6)) else "white" for c in range(7)] for r in range(7)]
        vals = np.zeros((7, 7), dtype=int)
        vals[1:6, 1:6] = np.arange(25).reshape(5, 5) % 7
        for r in range(oy, oy + 3):
            for c in range(ox, ox + 3):
                colors[r][c] = color
        grid(ax, vals, colors, fontsize=9)
        ax.add_patch(Rectangle((ox, oy), 3, 3, fill=False, edgecolor="black", lw=2.5))
        out_colors = [["white"] * 5 for _ in range(5)]
        out_colors[oy][ox] = color
        grid(ax, np.zeros((5, 5)), out_colors, fmt=None, origin=(11.5, 1))
        ax.add_patch(FancyArrowPatch((ox + 3, oy + 1.5), (11.5 + ox + 0.5, 1 + oy + 0.5), arrowstyle="->",
                                     mutation_scale=15, lw=1.5, color="black", connectionstyle="arc3,rad=-0.2"))
        ax.text(3.5, 7.25, "input 5x5, padding 1\n(grey = 0)", ha="center", va="top", fontsize=9)
        ax.text(14, 6.25, f"output 5x5\nout[{oy}, {ox}] = sum(kernel * patch)", ha="center", va="top", fontsize=9)
        blank(ax, (-0.3, 17.5), (-0.3, 8.5))
    fig.suptitle("A 3x3 kernel slides over the input; each position gives one output pixel", fontsize=11)
    save(fig, "03-conv-sliding", dpi=85)


def im2col_picture() -> None:
    """A 4x4 single-channel input, 3x3 kernel, stride 1: four patches become the four columns of cols."""
    x = np.arange(16).reshape(4, 4)
    patch_colors = [ORANGE, BLUE, GREEN, RED]
    fig = Figure(figsize=(10, 4.2))
    ax = fig.subplots()
    # the input with each patch outlined
    grid(ax, x, origin=(0, 2.5), fontsize=11)
    for k, (py, px) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        pad = 0.08 * (k + 1)
        ax.add_patch(Rectangle((px + pad, 2.5 + py + pad), 3 - 2 * pad, 3 - 2 * pad, fill=False,
                               edgecolor=patch_colors[k], lw=2.2))
    ax.text(2, 7.3, "x: 4x4 input", ha="center")
    # cols: 9 rows (kernel offsets i, j), 4 columns (output positions)
    cols = np.stack([x[py:py + 3, px:px + 3].ravel() for py, px in [(0, 0), (0, 1), (1, 0), (1, 1)]], axis=1)
    col_colors = [[patch_colors[c] for c in range(4)] for _ in range(9)]
    grid(ax, cols, col_colors, origin=(7, 0.5), text_color="white")
    ax.text(9, 10.5, "cols = im2col(x): 9 x 4\n(one column per output pixel)", ha="center", va="top")
    for r in range(9):
        ax.text(6.6, 0.5 + r + 0.5, f"({r // 3},{r % 3})", ha="right", va="center", fontsize=8, color="#555555")
    ax.text(6.6, 0.1, "(i, j)", ha="right", fontsize=8, color="#555555")
    ax.add_patch(FancyArrowPatch((4.2, 4.5), (6.0, 4.5), arrowstyle="->", mutation_scale=15, lw=1.5))
    # weight row times cols
    ax.text(12.2, 5.0, "W (1 x 9)  @  cols (9 x 4)  =  out (1 x 4)", va="center", fontsize=10)
    grid(ax, np.zeros((1, 4)), [patch_colors], fmt=None, origin=(14.5, 6.2))
    ax.text(16.5, 7.8, "reshape to 2x2:", ha="center", fontsize=9)
    grid(ax, np.zeros((2, 2)), [patch_colors[:2], patch_colors[2:]], fmt=None, origin=(15.5, 8.2))
    blank(ax, (-0.3, 20.5), (-0.3, 11.8))
    fig.suptitle("im2col: copy every patch into a column, then the convolution is one matrix product", fontsize=11)
    save(fig, "03-im2col", dpi=85)


# --- lesson 05 ---------------------------------------------------------------------------------------

def pooling() -> None:
    """Max-pool 2x2 forward (which input wins each window) and backward (the gradient goes to the winner)."""
    from tinyunet.nn import MaxPool2d

    x = np.array([[1, 5, 2, 0], [3, 2, 8, 1], [0, 4, 1, 1], [7, 2, 6, 3]], dtype=np.float64)
    pool = MaxPool2d(2)
    out = pool.forward(x[None, None])[0, 0]
    dout = np.array([[0.1, 0.2], [0.3, 0.4]])
    dx = pool.backward(dout[None, None])[0, 0]
    window_colors = [ORANGE, BLUE, GREEN, RED]
    light = ["#f6d3b0", "#c5d5ee", "#c9e3cf", "#efc4c5"]

    def win(r, c):
        return (r // 2) * 2 + c // 2

    fig = Figure(figsize=(10, 3.4))
    ax = fig.subplots()
    colors = [[window_colors[win(r, c)] if dx[r, c] != 0 else light[win(r, c)] for c in range(4)] for r in range(4)]
    grid(ax, x, colors, fmt="{:.0f}", fontsize=12)
    ax.text(2, 4.8, "x (4x4): winners dark", ha="center")
    grid(ax, out, [window_colors[:2], window_colors[2:]], fmt="{:.0f}", origin=(6, 1), fontsize=12)
    ax.text(7, 4.8, "forward: out = max", ha="center")
    ax.add_patch(FancyArrowPatch((4.2, 2), (5.8, 2), arrowstyle="->", mutation_scale=15, lw=1.5))
    grid(ax, dout, [window_colors[:2], window_colors[2:]], fmt="{:.1f}", origin=(11, 1), fontsize=12)
    ax.text(12, 4.8, "dout (2x2)", ha="center")
    ax.add_patch(FancyArrowPatch((13.2, 2), (14.8, 2), arrowstyle="->", mutation_scale=15, lw=1.5))
    grid(ax, dx, colors, fmt="{:g}", origin=(15, 0), fontsize=12)
    ax.text(17, 4.8, "backward: dx", ha="center")
    blank(ax, (-0.3, 19.3), (-0.3, 5.2))
    fig.suptitle("Max-pooling keeps the largest value of each window; backward sends dout to that position only",
                 fontsize=11)
    save(fig, "05-maxpool-argmax", dpi=85)


# --- lesson 06 ---------------------------------------------------------------------------------------

def checkerboard() -> None:
    """How many stamps of a stride-2 transposed convolution cover each output pixel, for kernels 2, 3, 4."""
    from tinyunet.nn import ConvTranspose2d

    fig = Figure(figsize=(11, 3.9), layout="constrained")
    axes = fig.subplots(1, 3)
    x = np.ones((1, 1, 5, 5))  # a constant input: any unevenness in the output comes from the overlaps
    for ax, k in zip(axes, (2, 3, 4)):
        up = ConvTranspose2d(1, 1, k, stride=2, bias=False).double()
        up.weight.data[...] = 1.0
        counts = up.forward(x)[0, 0]
        ax.imshow(counts, cmap="Oranges", vmin=0, vmax=4.5)
        for (r, c), v in np.ndenumerate(counts):
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v > 3 else "black")
        ax.set_title(f"kernel {k}, stride 2: output {counts.shape[0]}x{counts.shape[1]}\n"
                     + ("no overlap: even" if k == 2 else "uneven overlaps: checkerboard" if k == 3
                        else "even overlaps inside"), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Transposed convolution of a constant 5x5 input with an all-ones kernel: "
                 "each number counts the stamps covering that pixel", fontsize=11)
    save(fig, "06-checkerboard", dpi=85)


def transposed_stamp() -> None:
    """A transposed convolution (kernel 3, stride 2) as stamps: one input pixel paints a kernel-sized
    block of the output, its neighbour paints the next block 2 pixels further, and the overlap adds."""
    x = np.array([[1.0, 2.0], [0.0, 0.0]])
    w = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
    out = np.zeros((5, 5))
    out[0:3, 0:3] += x[0, 0] * w
    out[0:3, 2:5] += x[0, 1] * w
    fig = Figure(figsize=(10, 3.4))
    ax = fig.subplots()
    colors_in = [[ORANGE, BLUE], ["white", "white"]]
    grid(ax, x, colors_in, origin=(0, 1.5))
    ax.text(1, 1.2, "input x (2x2)", ha="center", fontsize=10)
    grid(ax, w, origin=(3.5, 1))
    ax.text(5, 0.7, "kernel w (3x3)", ha="center", fontsize=10)
    cols = [["white"] * 5 for _ in range(5)]
    for r in range(3):
        for c in range(3):
            cols[r][c] = "#f6c48f"
            cols[r][c + 2] = "#a9c4e6"
        cols[r][2] = "#c9a3c9"                             # the shared column: both stamps
    grid(ax, out, cols, origin=(8.5, 0))
    ax.text(11, -0.3, "output (5x5) = 1 * w at (0, 0) + 2 * w at (0, 2)", ha="center", fontsize=10)
    ax.add_patch(FancyArrowPatch((0.5, 2.0), (8.9, 0.4), arrowstyle="->", mutation_scale=14, color=ORANGE, lw=1.5,
                                 connectionstyle="arc3,rad=-0.25"))
    ax.add_patch(FancyArrowPatch((1.5, 2.0), (11.4, 0.4), arrowstyle="->", mutation_scale=14, color=BLUE, lw=1.5,
                                 connectionstyle="arc3,rad=-0.3"))
    ax.text(14.2, 1.5, "orange: stamp of x[0,0] = 1\nblue: stamp of x[0,1] = 2,\n    2 pixels to the right (stride 2)\n"
            "purple: both stamps overlap,\n    their values add", fontsize=9, va="center")
    blank(ax, (-0.3, 18.5), (-0.7, 5.2))
    fig.suptitle("A transposed convolution: every input pixel paints its value times the kernel; stamps stride apart, overlaps summed",
                 fontsize=10)
    save(fig, "06-transposed-stamp", dpi=85)


def conv_as_matrix() -> None:
    """A 3x3 convolution of a 4x4 image (no padding, stride 1) as a 4x16 sparse matrix A, and the
    transposed convolution as its transpose A^T (16x4)."""
    from tinyunet.nn import Conv2d

    w = np.arange(1, 10, dtype=float).reshape(3, 3)
    conv = Conv2d(1, 1, 3, bias=False).double()
    conv.weight.data[...] = w
    A = np.stack([conv.forward(np.eye(16)[k].reshape(1, 1, 4, 4)).ravel() for k in range(16)], axis=1)   # column k = conv(e_k)
    fig = Figure(figsize=(10.5, 4.6))
    ax_a, ax_t = fig.subplots(1, 2, gridspec_kw={"width_ratios": [16, 6]})
    for ax, M, title in [(ax_a, A, "convolution: y = A x\nA: 4 outputs x 16 input pixels"),
                         (ax_t, A.T, "transposed convolution: z -> A^T z\nA^T: 16 outputs x 4 inputs")]:
        colors = [[plt_color(v) for v in row] for row in M]
        grid(ax, M, colors, fmt="{:.0f}", fontsize=8, edge="#999999")
        for (r, c), v in np.ndenumerate(M):
            if v == 0:
                ax.texts[-M.size + r * M.shape[1] + c].set_text("")
        blank(ax, (-0.2, M.shape[1] + 0.2), (-0.2, M.shape[0] + 0.2))
        ax.set_title(title, fontsize=10)
    fig.suptitle("A 3x3 kernel (1..9) on a 4x4 image, no padding: each row of A is the kernel laid over the image",
                 fontsize=10, y=1.04)
    save(fig, "06-conv-as-matrix", dpi=85)


def plt_color(v: float) -> str:
    """White for 0, shades of blue for 1..9."""
    if v == 0:
        return "white"
    t = min(v / 9.0, 1.0)
    r, g, b = (int(255 - t * (255 - c)) for c in (59, 111, 182))
    return f"#{r:02x}{g:02x}{b:02x}"


def ravine() -> None:
    """Lesson 11: gradient descent and momentum on L = (a^2 + 50 b^2) / 2 from (-4, 1)."""
    def run(lr: float, momentum: float, steps: int) -> np.ndarray:
        p, v, path = np.array([-4.0, 1.0]), np.zeros(2), []
        for _ in range(steps):
            path.append(p.copy())
            v = momentum * v + p * [1.0, 50.0]
            p = p - lr * v
        return np.array(path)
    a, b = np.meshgrid(np.linspace(-4.5, 1, 200), np.linspace(-1.3, 1.3, 120))
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (title, path) in zip(axes, [("gradient descent, lr 0.035 (first 40 steps)", run(0.035, 0.0, 40)),
                                        ("momentum 0.9, lr 0.01 (first 40 steps)", run(0.01, 0.9, 40))]):
        ax.contour(a, b, 0.5 * (a ** 2 + 50 * b ** 2), levels=np.geomspace(0.05, 60, 12), colors="#bbbbbb", linewidths=0.7)
        ax.plot(path[:, 0], path[:, 1], "o-", color=ORANGE, ms=3, lw=1)
        ax.plot([0], [0], "k*", ms=10)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("a (shallow direction)")
    axes[0].set_ylabel("b (steep direction)")
    fig.suptitle("The ravine L = (a² + 50 b²)/2: gradient descent bounces across and creeps along; momentum adds up the steps along",
                 fontsize=10)
    save(fig, "11-ravine", dpi=80)


def from_lesson(lesson: str, produced: str, name: str) -> None:
    """Run a lesson with its real settings (pasted, as the tests do) and keep the picture it draws."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TINYUNET_LESSON_FAST"}
    env.update(MPLBACKEND="Agg")
    runner = ("import sys; sys.path.insert(0, 'tests'); from test_lessons import PastedLesson, python_blocks; "
              f"c = PastedLesson('lessons/{lesson}'); "
              f"[c.paste(n, b) for n, b in python_blocks(open('lessons/{lesson}').read())]")
    print(f"running lessons/{lesson} with its real settings (a few minutes)...")
    subprocess.run([sys.executable, "-c", runner], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    image = Image.open(REPO / produced).convert("RGB")
    buf = io.BytesIO()
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, format="png", optimize=True)
    (OUT / f"{name}.png").write_bytes(buf.getvalue())
    print(f"lessons/figures/{name}.png: {image.width}x{image.height}, {len(buf.getvalue()) / 1024:.0f} KB")


def learning_rates() -> None:
    from_lesson("11-optimizers.md", "runs/lesson-11/learning-rates.png", "11-learning-rates")


def with_and_without_skips() -> None:
    from_lesson("14-what-the-skips-buy.md", "runs/lesson-14/with-and-without-skips.png", "14-with-and-without-skips")


# --- lesson 09 ---------------------------------------------------------------------------------------

def unet_diagram() -> None:
    """The U-Net of tinyunet (base 16, depth 4) on a 128x128 input: shapes at every level, and the arrows."""
    depth, base, size = 4, 16, 128
    fig = Figure(figsize=(10, 6.4))
    ax = fig.subplots()
    heights = {lvl: 0.35 + 1.25 * (size >> lvl) / size for lvl in range(depth + 1)}

    def box(xc, lvl, channels, color, label=True):
        h = heights[lvl]
        w = 0.18 + 0.12 * np.log2(channels / base + 1)
        yc = -1.55 * lvl
        ax.add_patch(Rectangle((xc - w / 2, yc - h / 2), w, h, facecolor=color, edgecolor="black", lw=0.8))
        if label:
            s = size >> lvl
            ax.text(xc, yc + h / 2 + 0.07, f"{channels}x{s}x{s}", ha="center", va="bottom", fontsize=7.5)
        return xc, yc, w, h

    enc_color, dec_color, up_color = "#9ecae1", "#fdd0a2", "#c7e9c0"
    for lvl in range(depth):
        xc, yc, w, h = box(1.1 * lvl, lvl, base << lvl, enc_color)
        s = size >> lvl
        ax.text(xc - w / 2 - 0.08, yc, f"{s}x{s}", ha="right", va="center", fontsize=9)
        # pool arrow down to the next level
        ax.add_patch(FancyArrowPatch((xc + 0.05, yc - h / 2), (1.1 * (lvl + 1) - 0.05, -1.55 * (lvl + 1) + heights[lvl + 1] / 2),
                                     arrowstyle="->", mutation_scale=14, color=RED, lw=1.6))
        # decoder at the same level
        xd = 1.1 * (2 * depth - lvl)
        xu = xd - 0.33
        box(xu, lvl, base << lvl, up_color, label=False)
        box(xd, lvl, base << lvl, dec_color)
        ax.text(xd - 0.17, yc - heights[lvl] / 2 - 0.08, f"concat {base << lvl}+{base << lvl}", ha="center", va="top",
                fontsize=7, color="#555555")
        # skip arrow
        ax.add_patch(FancyArrowPatch((xc + w / 2 + 0.03, yc), (xu - 0.14, yc), arrowstyle="->", mutation_scale=14,
                                     color="#777777", lw=1.4, linestyle="--"))
        # up arrow from the level below
        ax.add_patch(FancyArrowPatch((1.1 * (2 * depth - lvl - 1) + 0.05, -1.55 * (lvl + 1) + heights[lvl + 1] / 2),
                                     (xu, yc - heights[lvl] / 2), arrowstyle="->", mutation_scale=14, color=GREEN, lw=1.6))
    xb, yb, wb, hb = box(1.1 * depth, depth, base << depth, enc_color)
    ax.text(xb, yb - hb / 2 - 0.12, "bottleneck 8x8", ha="center", va="top", fontsize=9)
    xh = 1.1 * 2 * depth
    ax.add_patch(FancyArrowPatch((xh + 0.2, 0), (xh + 1.0, 0), arrowstyle="->", mutation_scale=14, color="black", lw=1.4))
    ax.add_patch(Rectangle((xh + 1.05, -heights[0] / 2), 0.2, heights[0], facecolor="#e6e6e6", edgecolor="black", lw=0.8))
    ax.text(xh + 1.15, heights[0] / 2 + 0.07, "3", ha="center", va="bottom", fontsize=9)
    ax.text(xh + 1.15, -heights[0] / 2 - 0.1, "logits\n3x128x128", ha="center", va="top", fontsize=9)
    legend = [("double conv: (3x3 conv, BN, ReLU) x 2", enc_color), ("upsampled (ConvTranspose 2x2, stride 2)", up_color),
              ("double conv after concat", dec_color)]
    for i, (text, color) in enumerate(legend):
        ax.add_patch(Rectangle((4.6, -7.44 - 0.42 * i), 0.25, 0.28, facecolor=color, edgecolor="black", lw=0.8))
        ax.text(4.95, -7.3 - 0.42 * i, text, va="center", fontsize=9)
    arrows = [("max-pool 2x2: half the size", RED, "-"), ("up-convolution: double the size", GREEN, "-"),
              ("skip: copy, then concat", "#777777", "--"), ("1x1 conv head", "black", "-")]
    for i, (text, color, style) in enumerate(arrows):
        ax.plot([-0.3, 0.3], [-7.3 - 0.42 * i] * 2, color=color, lw=1.8, linestyle=style)
        ax.text(0.4, -7.3 - 0.42 * i, text, va="center", fontsize=9)
    ax.set_xlim(-1.0, 10.4)
    ax.set_ylim(-8.9, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.suptitle("tinyunet's standard U-Net (base 16, depth 4) on a 128x128 image: channels x height x width of every block's "
                 "output", fontsize=10)
    save(fig, "09-unet-diagram", dpi=90)


def memory_per_layer() -> None:
    """Measured memory kept for backward, and forward FLOPs, per block of the U-Net (one 128x128 image)."""
    from tinyunet.models import UNet
    from tinyunet.summary import summarize

    backend.seed(0)
    rows = summarize(UNet(base_channels=16, depth=4), (1, 3, 128, 128))
    blocks: dict = {}
    for r in rows:
        parts = r.name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("down", "up_conv", "pool", "up", "concat") else parts[0]
        mem, flops = blocks.get(key, (0, 0))
        blocks[key] = (mem + r.saved_bytes, flops + r.flops)
    order = ([k for i in range(4) for k in (f"down.{i}", f"pool.{i}")] + ["bottleneck"]
             + [k for i in range(4) for k in (f"up.{i}", f"up_conv.{i}")] + ["head"])
    order = [k for k in order if k in blocks]
    labels = {**{f"down.{i}": f"enc {i}\n{128 >> i}px" for i in range(4)}, **{f"pool.{i}": f"pool {i}" for i in range(4)},
              "bottleneck": "bottle-\nneck 8px", **{f"up.{i}": f"up {3 - i}" for i in range(4)},
              **{f"up_conv.{i}": f"dec {3 - i}\n{128 >> (3 - i)}px" for i in range(4)}, "head": "head"}
    colors = [BLUE if k.startswith("down") or k == "bottleneck" else GREY if k.startswith("pool") else GREEN if k.startswith("up.")
              else ORANGE if k.startswith("up_conv") else "#8e6bb0" for k in order]
    fig = Figure(figsize=(11, 5.6), layout="constrained")
    ax_mem, ax_flops = fig.subplots(2, 1, sharex=True)
    xs = np.arange(len(order))
    mem = np.array([blocks[k][0] for k in order]) / 2 ** 20
    flops = np.array([blocks[k][1] for k in order]) / 1e6
    ax_mem.bar(xs, mem, color=colors, edgecolor="black", lw=0.5)
    ax_mem.set_ylabel("MB kept for backward")
    ax_mem.set_title(f"Memory a training step keeps per block: {mem.sum():.1f} MB per 128x128 image "
                     f"(halves at every level down; grey: max-pool indices)", fontsize=10)
    ax_flops.bar(xs, flops, color=colors, edgecolor="black", lw=0.5)
    ax_flops.set_ylabel("forward MFLOP")
    ax_flops.set_title(f"Forward compute per block: {flops.sum() / 1e3:.2f} GFLOP in all "
                       f"(about the same at every level)", fontsize=10)
    ax_flops.set_xticks(xs, [labels[k] for k in order], fontsize=8)
    for ax in (ax_mem, ax_flops):
        ax.grid(axis="y", alpha=0.3)
    save(fig, "09-memory-per-layer", dpi=85)


# --- lesson 12 ---------------------------------------------------------------------------------------

def pets_root() -> Path:
    env = os.environ.get("TINYUNET_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "oxford-iiit-pet"


def pets() -> None:
    """Pet photos, their trimaps in the class colours, and overlays; plus one faulty annotation."""
    from tinyunet.classes import CLASS_NAMES, trimap_to_labels
    from tinyunet.viz import colorize, overlay

    root = pets_root()
    if not root.is_dir():
        print(f"skipping the pets figure: no Oxford-IIIT Pet folder at {root} (set TINYUNET_DATA)")
        return
    names = ["Abyssinian_100", "yorkshire_terrier_10", "Bengal_100", "american_bulldog_100", "saint_bernard_15"]
    fig = Figure(figsize=(11, 6.3), layout="constrained")
    axes = fig.subplots(3, len(names))
    for col, name in enumerate(names):
        image = Image.open(root / "images" / f"{name}.jpg").convert("RGB")
        trimap = np.asarray(Image.open(root / "annotations" / "trimaps" / f"{name}.png"))
        labels = trimap_to_labels(trimap)
        scale = 150 / max(image.size)  # small thumbnails keep the PNG small
        size = (round(image.width * scale), round(image.height * scale))
        photo = np.asarray(image.resize(size, Image.BILINEAR))
        small = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
        for row, (panel, title) in enumerate([(photo, name), (colorize(small), "trimap"), (overlay(photo, small, 0.45), "overlay")]):
            ax = axes[row][col]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title + ("\n(no pet marked!)" if name == "saint_bernard_15" else "") + f"\n{image.width}x{image.height}",
                             fontsize=9)
            if col == 0:
                ax.set_ylabel(["photo", "trimap", "overlay"][row])
    from matplotlib.patches import Patch
    from tinyunet.classes import PALETTE
    fig.legend(handles=[Patch(facecolor=np.asarray(c) / 255, edgecolor="black", label=f"{n} (trimap {i + 1})")
                        for i, (n, c) in enumerate(zip(CLASS_NAMES, PALETTE))],
               loc="outside lower center", ncol=3)
    save(fig, "12-pets-trimaps", dpi=80)


# --- lessons 13 and 07: one training run on shapes, with the real settings of lesson 13 -----------------

_TRAINED: dict = {}


def trained_shapes_model() -> dict:
    """Lesson 13's loop at its real settings (64x64, 800 shapes, 3 epochs, base 16), logging every step.

    Returns {"model", "val", "losses", "evals": [(step, {class: IoU}, miou)]}; computed once per run.
    """
    if _TRAINED:
        return _TRAINED
    from tinyunet.backend import to_device
    from tinyunet.data import iterate_batches, make_shapes
    from tinyunet.losses import CrossEntropyLoss
    from tinyunet.models import UNet
    from tinyunet.optim import Adam
    from tinyunet.train import evaluate_model

    size, num_train, epochs, base = 64, 800, 3, 16
    train = make_shapes(num_train, size, seed=0)
    val = make_shapes(num_train // 8, size, seed=10_000)
    backend.seed(0)
    model = UNet(in_channels=3, num_classes=3, base_channels=base, depth=4)
    optimizer = Adam(model.parameters(), lr=1e-3)
    loss_fn = CrossEntropyLoss()
    rng = np.random.default_rng(0)
    losses, evals = [], []
    print("training the shapes model of lesson 13 (a minute or two)...")
    for epoch in range(epochs):
        for x, y, _ in iterate_batches(train, batch_size=8, shuffle=True, rng=rng, augment=True, drop_last=True):
            model.train()
            x, y = to_device(x), to_device(y)
            optimizer.zero_grad()
            loss = loss_fn.forward(model.forward(x), y)
            model.backward(loss_fn.backward())
            optimizer.step()
            losses.append(float(loss))
            if len(losses) % 25 == 0:
                r = evaluate_model(model, val)
                evals.append((len(losses), r["iou"], r["miou"], r["loss"]))
    print(f"  final validation mIoU {evals[-1][2]:.3f}")
    _TRAINED.update(model=model, val=val, losses=losses, evals=evals)
    return _TRAINED


def training_curves() -> None:
    from tinyunet.classes import CLASS_NAMES

    run = trained_shapes_model()
    losses = np.array(run["losses"])
    steps = np.arange(1, len(losses) + 1)
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_loss, ax_iou = fig.subplots(1, 2)
    ax_loss.plot(steps, losses, color=BLUE, alpha=0.3, lw=1, label="training loss (each step)")
    window = 20
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax_loss.plot(steps[window - 1:], smooth, color=BLUE, lw=2, label=f"training loss ({window}-step mean)")
    ev_steps = [e[0] for e in run["evals"]]
    ax_loss.plot(ev_steps, [e[3] for e in run["evals"]], "o-", color=ORANGE, ms=3, label="validation loss")
    ax_loss.axhline(np.log(3), color=GREY, ls="--", lw=1)
    ax_loss.text(steps[-1], np.log(3) + 0.03, "log 3: uniform guess", ha="right", fontsize=8, color="#777777")
    ax_loss.set(xlabel="step (batch of 8)", ylabel="cross-entropy", title="Loss", ylim=(0, 1.5))
    ax_loss.legend(fontsize=8)
    colors = {"pet": ORANGE, "background": "#444466", "outline": "#c9a800"}
    for name in CLASS_NAMES:
        ax_iou.plot(ev_steps, [e[1][name] for e in run["evals"]], "o-", ms=3, color=colors[name], label=f"IoU {name}")
    ax_iou.plot(ev_steps, [e[2] for e in run["evals"]], "o-", ms=3, lw=2.5, color=GREEN, label="mean IoU")
    ax_iou.set(xlabel="step (batch of 8)", ylabel="IoU on 100 validation images", title="Validation IoU", ylim=(0, 1))
    ax_iou.legend(fontsize=8, loc="lower right")
    for ax in (ax_loss, ax_iou):
        ax.grid(alpha=0.3)
    fig.suptitle("Lesson 13's loop on shapes: 64x64, 800 images, 3 epochs, Adam lr 1e-3", fontsize=11)
    save(fig, "13-training-curves", dpi=85)


def _activations(model, x):
    """Forward in eval mode, keeping the first encoder output, the bottleneck, the last upsampled map and logits."""
    model.eval()
    acts = {}
    skips = []
    h = x
    for block, pool in zip(model.down, model.pool):
        h = block(h)
        skips.append(h)
        h = pool(h)
    h = model.bottleneck(h)
    acts["bottleneck"] = h
    for i, skip in enumerate(reversed(skips)):
        u = model.up[i](h)
        h = model.up_conv[i](model.concat[i](u, skip))
    acts["skip0"], acts["up_last"], acts["logits"] = skips[0], u, model.head(h)
    model.train()
    return {k: np.asarray(backend.to_host(v)) for k, v in acts.items()}


def _strongest(a, k):
    """Indices of the k channels with the largest spatial variance (the most informative to look at)."""
    return np.argsort(a.reshape(a.shape[0], -1).var(axis=1))[::-1][:k]


def predictions() -> None:
    from tinyunet.data import iterate_batches
    from tinyunet.viz import colorize

    run = trained_shapes_model()
    val = run["val"].subset(range(5))
    x = next(iterate_batches(val, 5, shuffle=False, rng=None))[0]
    pred = _activations(run["model"], x)["logits"].argmax(axis=1)
    fig = Figure(figsize=(9, 5.6), layout="constrained")
    axes = fig.subplots(3, 5)
    for col in range(5):
        for row, (panel, label) in enumerate([(val.images[col], "image"), (colorize(val.labels[col]), "true mask"),
                                              (colorize(pred[col]), "prediction")]):
            ax = axes[row][col]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label)
    from matplotlib.patches import Patch
    from tinyunet.classes import CLASS_NAMES, PALETTE
    fig.legend(handles=[Patch(facecolor=np.asarray(c) / 255, edgecolor="black", label=n) for n, c in zip(CLASS_NAMES, PALETTE)],
               loc="outside lower center", ncol=3)
    save(fig, "13-predictions", dpi=75)


def feature_maps() -> None:
    from tinyunet.data import iterate_batches

    run = trained_shapes_model()
    val = run["val"].subset([1])
    x = next(iterate_batches(val, 1, shuffle=False, rng=None))[0]
    acts = _activations(run["model"], x)
    fig = Figure(figsize=(10, 3.9), layout="constrained")
    axes = fig.subplots(2, 7)
    for row, (key, title) in enumerate([("skip0", "encoder 0, 64x64"), ("bottleneck", "bottleneck, 4x4")]):
        axes[row][0].imshow(val.images[0])
        axes[row][0].set_title("input" if row == 0 else "", fontsize=9)
        a = acts[key][0]
        for j, ch in enumerate(_strongest(a, 6)):
            axes[row][j + 1].imshow(a[ch], cmap="magma", interpolation="nearest")
            axes[row][j + 1].set_title(f"{title}\nchannel {ch}" if j == 0 else f"channel {ch}", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Feature maps of the trained network: the 6 most varied channels of the first block and of the bottleneck",
                 fontsize=10)
    save(fig, "13-feature-maps", dpi=80)


def skip_features() -> None:
    from tinyunet.data import iterate_batches
    from tinyunet.viz import colorize

    run = trained_shapes_model()
    val = run["val"].subset([0])
    x = next(iterate_batches(val, 1, shuffle=False, rng=None))[0]
    acts = _activations(run["model"], x)
    fig = Figure(figsize=(10, 2.5), layout="constrained")
    axes = fig.subplots(1, 8)
    panels = [(val.images[0], "input", None)]
    panels += [(acts["skip0"][0][c], f"skip, ch {c}", "magma") for c in _strongest(acts["skip0"][0], 3)]
    panels += [(acts["up_last"][0][c], f"upsampled, ch {c}", "viridis") for c in _strongest(acts["up_last"][0], 3)]
    panels += [(colorize(acts["logits"][0].argmax(axis=0)), "prediction", None)]
    for ax, (panel, title, cmap) in zip(axes, panels):
        ax.imshow(panel, cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("At the top decoder level: the skip (sharp, local) and the upsampled path (coarse, knows the region)",
                 fontsize=10)
    save(fig, "07-skip-features", dpi=80)


# --- lesson 16 ---------------------------------------------------------------------------------------

def attention_maps() -> None:
    """Lesson 16's run: an Attention U-Net trained like lesson 13's U-Net (64x64 shapes, 800 images,
    3 epochs, base 16); the coefficients of its four gates over three validation images."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from tinyunet.backend import to_device
    from tinyunet.data import iterate_batches, make_shapes
    from tinyunet.losses import CrossEntropyLoss
    from tinyunet.models import create_model
    from tinyunet.optim import Adam
    from tinyunet.predict import attention_images
    from tinyunet.train import evaluate_model
    from tinyunet.viz import colorize

    size, num_train, epochs, base = 64, 800, 3, 16
    train = make_shapes(num_train, size, seed=0)
    val = make_shapes(num_train // 8, size, seed=10_000)
    backend.seed(0)
    model = create_model("attunet", in_channels=3, num_classes=3, base_channels=base, depth=4)
    optimizer, loss_fn = Adam(model.parameters(), lr=1e-3), CrossEntropyLoss()
    rng = np.random.default_rng(0)
    print("training the Attention U-Net of lesson 16 (a minute or two)...")
    for epoch in range(epochs):
        model.train()
        for x, y, _ in iterate_batches(train, batch_size=8, shuffle=True, rng=rng, augment=True, drop_last=True):
            optimizer.zero_grad()
            loss_fn.forward(model.forward(to_device(x)), to_device(y))
            model.backward(loss_fn.backward())
            optimizer.step()
    print(f"  validation mIoU {evaluate_model(model, val)['miou']:.3f}")
    picks = [0, 1, 2]
    heat = ScalarMappable(Normalize(0.0, 1.0), "jet")  # as tinyunet.viz.plot_attention (predict --attention)
    fig = Figure(figsize=(10.5, 5.6), layout="constrained")
    axes = fig.subplots(len(picks), 6)
    model.eval()
    for row, i in enumerate(picks):
        one = val.subset([i])
        model.forward(to_device(next(iterate_batches(one, 1, shuffle=False, rng=None))[0]))
        maps, titles = attention_images(model, size, size)
        gray = one.images[0].mean(axis=2)
        axes[row][0].imshow(one.images[0])
        axes[row][1].imshow(colorize(one.labels[0]), interpolation="nearest")
        for ax, m in zip(axes[row][2:], maps):
            ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
            ax.imshow(m, cmap=heat.cmap, norm=heat.norm, alpha=0.6)
        if row == 0:
            for ax, title in zip(axes[row], ["image", "true mask"] + [f"gate on {t}" for t in titles]):
                ax.set_title(title.replace("skip 8x8", "skip 8x8\n(deepest)").replace("skip 64x64", "skip 64x64\n(top level)"),
                             fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(heat, ax=list(axes.ravel()), shrink=0.6, label="attention coefficient")
    fig.suptitle("Attention U-Net after 3 epochs on 64x64 shapes: each gate's coefficients over validation images",
                 fontsize=10)
    save(fig, "16-attention-maps", dpi=80)


FIGURES = {
    "conv_sliding": conv_sliding,
    "im2col": im2col_picture,
    "pooling": pooling,
    "checkerboard": checkerboard,
    "transposed_stamp": transposed_stamp,
    "conv_as_matrix": conv_as_matrix,
    "unet_diagram": unet_diagram,
    "memory_per_layer": memory_per_layer,
    "pets": pets,
    "training_curves": training_curves,
    "predictions": predictions,
    "feature_maps": feature_maps,
    "skip_features": skip_features,
    "attention_maps": attention_maps,
    "ravine": ravine,
    "learning_rates": learning_rates,
    "with_and_without_skips": with_and_without_skips,
}


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; choose from {', '.join(FIGURES)}")
    for name in names or FIGURES:
        FIGURES[name]()
    files = sorted(OUT.glob("*.png"))
    print(f"{len(files)} figures in {OUT.relative_to(REPO)}, {sum(f.stat().st_size for f in files) / 1024:.0f} KB in all")


if __name__ == "__main__":
    main(sys.argv[1:])
