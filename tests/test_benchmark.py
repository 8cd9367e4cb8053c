"""benchmarks/train_step.py runs, and counts the FLOPs it divides by correctly."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def unet_forward_flops(n: int, size: int, base: int, depth: int, in_ch: int = 3, classes: int = 3) -> int:
    """Forward FLOPs (2 per multiply-add) of the U-Net's convolutions, from its architecture."""
    conv3 = lambda cin, cout, s: 2 * n * s * s * cin * cout * 9
    total, cin, s = 0, in_ch, size
    for level in range(depth + 1):                 # encoder levels, then the bottleneck
        cout = base * 2 ** level
        total += conv3(cin, cout, s) + conv3(cout, cout, s)
        cin, s = cout, s // 2
    s *= 2                                         # the bottleneck's size
    for level in reversed(range(depth)):
        cout = base * 2 ** level
        total += 2 * n * s * s * cin * cout * 4    # 2x2 up-convolution, stride 2, from the s x s input
        s *= 2
        total += conv3(2 * cout, cout, s) + conv3(cout, cout, s)
        cin = cout
    return total + 2 * n * s * s * cin * classes   # 1x1 head


@pytest.mark.slow
def test_train_step_benchmark_reports_consistent_figures():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "32", "--base-channels", "4", "--depth", "2",
                           "--batch-size", "2", "--steps", "2", "--warmup", "1", "--breakdown-steps", "1",
                           "--per-conv", "--json", "--rounds", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    ours = result["tinyunet"]
    assert ours["forward_gflop"] * 1e9 == pytest.approx(unet_forward_flops(2, 32, 4, 2), rel=1e-9)
    assert ours["train_gflop"] == pytest.approx(3 * ours["forward_gflop"])
    assert 0 < ours["ms_min"] <= ours["ms_median"]
    for layer in ("Conv2d", "ConvTranspose2d", "BatchNorm2d", "ReLU", "MaxPool2d"):
        assert ours["breakdown_ms"][f"{layer}.fwd"] > 0 and ours["breakdown_ms"][f"{layer}.bwd"] > 0
    # --per-conv: the 11 convolutions of a depth-2 U-Net in forward order, summing to the Conv2d rows
    convs = [k[:-4] for k in ours["breakdown_ms"] if k.startswith("conv ") and k.endswith(".fwd")]
    widths = ["3->4", "4->4", "4->8", "8->8", "8->16", "16->16", "16->8", "8->8", "8->4", "4->4", "4->3"]
    assert convs == [f"conv {k:2d}: {w}" for k, w in enumerate(widths)]
    for direction in ("fwd", "bwd"):
        per_conv = sum(ours["breakdown_ms"][f"{name}.{direction}"] for name in convs)
        assert per_conv == pytest.approx(ours["breakdown_ms"][f"Conv2d.{direction}"], rel=0.05)
    assert "each convolution, in the order of the forward pass" in proc.stdout
    assert ours["tracemalloc_peak_mb"] > 0
    assert ours["rss_peak_delta_mb"] >= 0  # tiny arrays come from the heap: RSS may not grow at all
    assert result["machine_gflops"] > 0
    assert "freed memory kept for reuse" in proc.stdout
    summary = proc.stdout.split("== 2 rounds")[1].splitlines()[1]
    assert summary.startswith("  batch 2, base 4: tinyunet ") and len(summary.split("ms")[0].split()) == 7
    assert "== batch 2, base 4: breakdown, median of 2 rounds" in proc.stdout
    from tinyunet.accel import compiled_loops as kernels
    if kernels.available():                        # Numba installed: the benchmark says it runs the loops
        assert ours["loops"].startswith("BatchNorm/ReLU as Numba ") and ours["loops"].endswith(
            " loops, shifted convolutions as its direct kernels")
    else:
        assert ours["loops"] == "BatchNorm/ReLU as NumPy passes, convolutions on BLAS"


@pytest.mark.slow
def test_numpy_only_runs_batchnorm_and_relu_as_numpy_passes():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "16", "--base-channels", "2", "--depth", "1",
                           "--batch-size", "1", "--steps", "1", "--warmup", "0", "--breakdown-steps", "0",
                           "--no-memory", "--numpy-only", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["tinyunet"]["loops"] == "BatchNorm/ReLU as NumPy passes, convolutions on BLAS"
    assert "BatchNorm/ReLU as NumPy passes, convolutions on BLAS" in proc.stdout


@pytest.mark.slow
def test_memory_trace_lists_layer_calls_by_peak():
    script = SCRIPT.parent / "memory_trace.py"
    proc = subprocess.run([sys.executable, str(script), "--size", "32", "--base-channels", "4", "--depth", "2",
                           "--batch-size", "2", "--top", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    step_peak = float(lines[0].split()[2])
    rows = [line.rsplit(None, 3) for line in lines[2:]]
    assert len(rows) == 4 and all(r[0].endswith((".forward", ".backward")) for r in rows)
    peaks = [float(r[2]) for r in rows]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] == pytest.approx(step_peak, abs=0.05)
    assert all(float(r[1]) <= float(r[2]) for r in rows)  # kept <= peak


def test_conv_layers_lists_every_unet_conv_shape_and_method():
    """benchmarks/conv_layers.py: the U-Net's distinct 3x3 shapes (counted by hand for base 4, depth 2),
    the reference and every accelerated implementation that takes the shape timed (the direct kernels
    need multiples of 16 output channels: 16 -> 16 only, with Numba), and the chooser's pick marked."""
    from tinyunet.accel import compiled_loops
    script = SCRIPT.parent / "conv_layers.py"
    proc = subprocess.run([sys.executable, str(script), "--size", "16", "--base-channels", "4", "--depth", "2",
                           "--batch-size", "2", "--reps", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(proc.stdout.strip().splitlines()[-1])["layers"]
    # encoder 3->4, 4->4 @16; 4->8, 8->8 @8; bottleneck 8->16, 16->16 @4; decoder 16->8, (8->8) @8,
    # 8->4, (4->4) @16 (the ones in brackets were seen already)
    assert [tuple(l["shape"]) for l in layers] == [(3, 4, 16), (4, 4, 16), (4, 8, 8), (8, 8, 8), (8, 16, 4),
                                                    (16, 16, 4), (16, 8, 8), (8, 4, 16)]
    for layer in layers:
        direct = {"direct"} if layer["shape"] == [16, 16, 4] and compiled_loops.available() else set()
        assert set(layer["ms"]) == {"reference", "im2col", "im2row", "shifted", "winograd"} | direct  # sides even
        assert all(ms > 0 for ms in layer["ms"].values())
        assert layer["default"] in layer["ms"]
    assert layers[0]["default"] == "im2col" and layers[3]["default"] == "im2row"


def test_torch_breakdown_times_every_layer_type_and_convolution():
    """Only where torch is installed (an optional extra; CI has none): PyTorch's hooks-based
    breakdown has the same names as ours, and its per-convolution rows add up to its Conv2d row."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(SCRIPT.parent))
    import train_step
    args = train_step.parse_args(["--size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "2",
                                  "--steps", "1", "--warmup", "1", "--breakdown-steps", "2"])
    b = train_step.torch_worker(args, memory=False)["breakdown_ms"]
    for layer in ("Conv2d", "ConvTranspose2d", "BatchNorm2d", "ReLU", "MaxPool2d", "loss"):
        assert b[f"{layer}.fwd"] > 0 and b[f"{layer}.bwd"] > 0
    convs = [k[:-4] for k in b if k.startswith("conv ") and k.endswith(".fwd")]
    assert [name.split(": ")[1] for name in convs] == ["3->4", "4->4", "4->8", "8->8", "8->16", "16->16",
                                                       "16->8", "8->8", "8->4", "4->4", "4->3"]
    for direction in ("fwd", "bwd"):
        assert sum(b[f"{name}.{direction}"] for name in convs) == pytest.approx(b[f"Conv2d.{direction}"], rel=0.05)
    parts = sum(v for k, v in b.items() if k != "total" and not k.startswith("conv "))
    assert 0 < parts < b["total"]


@pytest.mark.slow
def test_compiled_loops_benchmark_alternates_and_reports_every_layer():
    pytest.importorskip("numba")
    script = SCRIPT.parent / "compiled_loops.py"
    proc = subprocess.run([sys.executable, str(script), "--pairs", "2", "--size", "16", "--base-channels", "2",
                           "--depth", "1", "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("== UNet(base_channels=2, depth=1") and "2 pairs of steps" in lines[0]
    names = [line.split("  ")[1].strip() for line in lines[1:5]]
    assert names == ["BatchNorm2d backward", "BatchNorm2d forward", "ReLU backward", "ReLU forward"]
    columns = []
    for line in lines[1:7]:                       # "<name>  a ms  ->  b ms": two times, each measured
        times = [float(word) for word in line.replace("->", " ").split() if word.replace(".", "").isdigit()]
        assert len(times) == 2 and all(t >= 0 for t in times), line
        columns.append(times)
    # a tiny layer may round to 0.00 ms; the step (last line of the six) and the sum of the layers may not
    assert all(t > 0 for t in columns[-1]) and all(sum(c[k] for c in columns[:4]) > 0 for k in (0, 1))
    assert 0 < float(lines[7].split()[-1]) < 10


def test_compiled_loops_benchmark_times_the_convolutions_with_and_without_the_direct_kernels():
    pytest.importorskip("numba")
    script = SCRIPT.parent / "compiled_loops.py"
    proc = subprocess.run([sys.executable, str(script), "--convolutions", "--pairs", "2", "--size", "16",
                           "--base-channels", "16", "--depth", "1", "--batch-size", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "BLAS products / direct kernels alternating" in lines[0]
    assert [line.split("  ")[1].strip() for line in lines[1:3]] == ["Conv2d backward", "Conv2d forward"]
    for line in lines[1:5]:
        times = [float(word) for word in line.replace("->", " ").split() if word.replace(".", "").isdigit()]
        assert len(times) == 2 and all(t > 0 for t in times), line
    assert "direct kernels / BLAS" in lines[5] and 0 < float(lines[5].split()[-1]) < 10


def test_recipe_table_reads_the_scores_evaluate_writes(tmp_path):
    """benchmarks/recipe_table.py parses `tinyunet evaluate`'s report: the values read back are the ones
    the report was made from (training size, own size, outline), and the rows group seeds."""
    from tinyunet.evaluate import format_report
    sys.path.insert(0, str(SCRIPT.parent))
    import recipe_table

    def result(miou, outline, native=None):
        scores = {"pixel_accuracy": 0.9, "miou": miou, "mdice": 0.8,
                  "iou": {"pet": 0.81, "background": 0.91, "outline": outline},
                  "dice": {"pet": 0.9, "background": 0.95, "outline": 0.7}}
        r = {"checkpoint": "c", "data": "d", "split": "test", "num_images": 3, "size": 128,
             "confusion": [[5, 1, 1], [1, 5, 1], [1, 1, 5]], **scores}
        if native is not None:
            r["native"] = {**scores, "miou": native, "iou": {**scores["iou"], "outline": outline - 0.01}}
        return r

    assert recipe_table.scores(format_report(result(0.7524, 0.5281, native=0.7535))) == {
        "miou": 0.7524, "outline": 0.5281, "native miou": 0.7535, "native outline": 0.5181}
    assert recipe_table.scores(format_report(result(0.61, 0.42))) == {"miou": 0.61, "outline": 0.42}
    for seed, (miou, outline) in enumerate([(0.75, 0.52), (0.76, 0.54)]):
        run = tmp_path / f"unet-s{seed}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"arch": "unet", "epochs": 45, "loss": "ce+dice", "seed": seed,
                                                     "base_channels": 4, "depth": 2}))
        (run / "test.txt").write_text(format_report(result(miou, outline)))
    table = subprocess.run([sys.executable, str(SCRIPT.parent / "recipe_table.py"), *sorted(tmp_path.iterdir())],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(table) == 3 and table[2].startswith("| unet, 45 epochs, ce+dice |")
    assert "| 0, 1 | 0.7550 (0.7500–0.7600) |" in table[2] and "| 0.5300 (0.5200–0.5400) |" in table[2]


def test_readme_variants_table_is_the_committed_runs():
    """The README's variants table at the real budget holds, for each architecture, the seeds and the test
    mIoU mean (range) that benchmarks/recipe_table.py computes from the committed reports in docs/recipe."""
    repo = SCRIPT.parent.parent
    runs = sorted(p for p in (repo / "docs" / "recipe").glob("*-45ep-s*") if p.name.split("-")[0] in
                  ("unet", "resunet", "attunet"))
    table = subprocess.run([sys.executable, str(SCRIPT.parent / "recipe_table.py"), *runs],
                           capture_output=True, text=True, check=True).stdout.splitlines()[2:]
    readme = (repo / "README.md").read_text(encoding="utf-8").splitlines()
    for arch in ("unet", "resunet", "attunet"):
        cells = [c.strip() for c in next(r for r in table if r.startswith(f"| {arch},")).split("|")]
        seeds, miou = cells[3], cells[4]
        row = next(line for line in readme if f"(`{arch}`)" in line and "| 0, 1 |" in line)
        assert f"| {seeds} | " in row and miou.split(" ")[1] in row and miou.split(" ")[0] in row, (arch, row, miou)
