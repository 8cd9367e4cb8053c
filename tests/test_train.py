"""`tinyunet train`: run folder contents, determinism, resume after kill -9, NaN handling.

Every run is tiny (synthetic shapes at 32 px, a 4-channel depth-2 U-Net) so a run takes well under a
second in-process; only the kill -9 test starts a child process.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyunet import train as train_module
from tinyunet.data.transforms import Augmentation

TINY = ["--dataset", "shapes", "--size", "32", "--num-shapes", "48", "--base-channels", "4", "--depth", "2",
        "--batch-size", "8", "--quiet"]
STEPS_PER_EPOCH = 48 // 8
EVERY_TRANSFORM = ["--scale", "0.6", "--rotate", "15", "--brightness", "0.2", "--contrast", "0.2", "--saturation", "0.2"]
METRICS_COLUMNS = ["epoch", "train_loss", "val_loss", "val_pixel_accuracy", "val_miou", "val_iou_pet",
                   "val_iou_background", "val_iou_outline", "lr", "seconds", "images_per_second"]


@pytest.fixture
def no_figures(monkeypatch):
    """Skip curves.png / predictions.png (matplotlib dominates the time of these tiny runs)."""
    monkeypatch.setattr(train_module.Trainer, "_figures", lambda self, *args: None)


def train_args(out: Path, epochs: int = 2, *extra: str) -> list:
    return ["train", *TINY, "--epochs", str(epochs), "--out", str(out), *extra]


def read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def meta_of(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"][()]))


def metrics_rows(run: Path) -> list:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = read_npz(a), read_npz(b)
    keys = sorted(k for k in wa if k != "meta")
    assert keys == sorted(k for k in wb if k != "meta")
    assert any(k.startswith("model/") for k in keys) and any(k.startswith("optim/") for k in keys)
    different = [k for k in keys if not np.array_equal(wa[k], wb[k])]
    assert different == [], f"arrays differ: {different[:5]}"


def test_run_folder_contents(run_cli, tmp_path):
    run = tmp_path / "run"
    status, out, err = run_cli(*train_args(run, 2))
    assert status == 0, err
    assert "done: best validation mIoU" in out
    for name in ["config.json", "metrics.csv", "last.npz", "best.npz", "curves.png", "predictions.png",
                 "augmentations.png"]:
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp"))

    config = json.loads((run / "config.json").read_text())
    assert (config["dataset"], config["size"], config["epochs"], config["base_channels"], config["depth"]) == \
        ("shapes", 32, 2, 4, 2)

    with open(run / "metrics.csv", newline="") as f:
        assert next(csv.reader(f)) == METRICS_COLUMNS
    rows = metrics_rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        values = {k: float(v) for k, v in r.items()}
        assert all(math.isfinite(v) for v in values.values())
        assert values["train_loss"] > 0 and values["val_loss"] > 0
        for k in ["val_pixel_accuracy", "val_miou", "val_iou_pet", "val_iou_background", "val_iou_outline"]:
            assert 0.0 <= values[k] <= 1.0
        ious = [values[f"val_iou_{c}"] for c in ("pet", "background", "outline")]
        assert values["val_miou"] == pytest.approx(np.mean(ious), abs=1e-5)

    # checkpoints are plain npz: no pickle, meta is a JSON string with epoch, config and arch
    last, best = read_npz(run / "last.npz"), read_npz(run / "best.npz")
    assert last["meta"].dtype.kind == "U" and last["meta"].ndim == 0
    meta = meta_of(run / "last.npz")
    assert meta["epoch"] == 2 and meta["arch"] == "unet"
    assert meta["config"] == config
    assert all(last[k].dtype.kind in "fiu" for k in last if k != "meta")
    assert "model/head.weight" in last and last["model/head.weight"].shape[:2] == (3, 4)
    best_meta = meta_of(run / "best.npz")
    mious = [float(r["val_miou"]) for r in rows]
    assert best_meta["epoch"] == 1 + int(np.argmax(mious))  # first epoch reaching the best mIoU
    assert best_meta["best_miou"] == pytest.approx(max(mious), abs=1e-6)
    assert set(best) == set(last)

    for name in ["curves.png", "predictions.png"]:
        with Image.open(run / name) as im:
            im.load()
            assert im.width > 100 and im.height > 100
    with Image.open(run / "augmentations.png") as im:  # 4 images x 4 variants, photo above mask: 32 x 64 cells
        assert im.size == (4 * 32 + 3 * 4, 4 * 64 + 3 * 4)


def test_same_seed_same_weights_other_seed_different(run_cli, tmp_path, no_figures):
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        status, _, err = run_cli(*train_args(tmp_path / name, 2, "--seed", str(seed)))
        assert status == 0, err
    assert_same_weights(tmp_path / "a" / "last.npz", tmp_path / "b" / "last.npz")
    a, c = read_npz(tmp_path / "a" / "last.npz"), read_npz(tmp_path / "c" / "last.npz")
    assert not any(np.array_equal(a[k], c[k]) for k in a if k.startswith("model/") and k.endswith("weight"))


def test_thread_count_does_not_change_the_weights(run_cli, tmp_path, no_figures):
    """Big enough for the layers to split their rows into blocks (tinyunet/parallel.py)."""
    from tinyunet.accel import parallel
    assert len(parallel.row_blocks(8 * 66 * 66, 9 * 16 * 16)) > 1
    before = parallel.get_num_threads()
    try:
        for threads in (1, 2):
            status, _, err = run_cli("train", "--dataset", "shapes", "--size", "64", "--num-shapes", "16",
                                     "--base-channels", "16", "--depth", "2", "--batch-size", "8", "--quiet",
                                     "--epochs", "1", "--threads", str(threads), "--out", str(tmp_path / str(threads)))
            assert status == 0, err
    finally:
        parallel.set_num_threads(before)
    assert_same_weights(tmp_path / "1" / "last.npz", tmp_path / "2" / "last.npz")


def test_resume_after_kill_9_matches_uninterrupted_run(run_cli, cli_env, tmp_path, no_figures):
    # big enough that an epoch takes a noticeable time, so the kill lands while the child still trains
    # every random transform on, and the Dice loss: their random numbers must replay exactly too
    args = ["train", *TINY, "--num-shapes", "160", "--epochs", "4", "--seed", "3", *EVERY_TRANSFORM, "--loss", "ce+dice"]
    run = tmp_path / "killed"
    last = run / "last.npz"
    child = subprocess.Popen([sys.executable, "-m", "tinyunet.cli", *args, "--out", str(run)], env=cli_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_after = None
    seen = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if last.exists():
                epoch = meta_of(last)["epoch"]  # every version of last.npz we see must load
                seen.add(epoch)
                if epoch >= 1:
                    time.sleep(0.15)  # into the next epoch's steps, not just its first instant
                    os.kill(child.pid, signal.SIGKILL)
                    killed_after = epoch
                    break
            time.sleep(0.005)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    stderr = child.stderr.read()
    child.stderr.close()
    assert killed_after is not None, f"the run ended (status {child.returncode}) before it could be killed: {stderr}"
    assert child.returncode == -signal.SIGKILL
    epoch_at_kill = meta_of(last)["epoch"]
    assert 1 <= epoch_at_kill < 4, "killed too late to test anything"

    status, out, err = run_cli(*args, "--out", run, "--resume")
    assert status == 0, err
    assert f"resuming {run} after epoch {epoch_at_kill}" in out
    assert [int(r["epoch"]) for r in metrics_rows(run)] == [1, 2, 3, 4]
    assert meta_of(last)["epoch"] == 4
    assert not list(run.glob("*.tmp"))  # a temp file left by the kill is cleaned up on resume

    status, _, err = run_cli(*args, "--out", tmp_path / "straight")
    assert status == 0, err
    assert_same_weights(last, tmp_path / "straight" / "last.npz")
    # metrics are replayed exactly too (apart from timings)
    replayed, straight = metrics_rows(run), metrics_rows(tmp_path / "straight")
    for r1, r2 in zip(replayed, straight):
        for k in ["train_loss", "val_loss", "val_miou", "lr"]:
            assert r1[k] == r2[k]


@pytest.mark.parametrize("window", ["after last.npz of epoch 1", "before last.npz of epoch 2"])
def test_crash_between_checkpoint_and_metrics_keeps_one_row_per_epoch(run_cli, tmp_path, monkeypatch, window,
                                                                      no_figures):
    """A death at the worst moments of an epoch end: metrics.csv and last.npz must stay consistent."""
    real_save = train_module.save_checkpoint

    def dying_save(path, model_state, optim_state, meta):
        if Path(path).name == "last.npz":
            if window.startswith("before") and meta["epoch"] == 2:
                raise KeyboardInterrupt  # as if killed just before writing last.npz
            real_save(path, model_state, optim_state, meta)
            if window.startswith("after") and meta["epoch"] == 1:
                raise KeyboardInterrupt  # as if killed right after writing last.npz
        else:
            real_save(path, model_state, optim_state, meta)

    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "save_checkpoint", dying_save)
    status, _, err = run_cli(*train_args(run, 3))
    assert status == 130 and "interrupted" in err
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert meta_of(run / "last.npz")["epoch"] == 1
    (run / "last.npz.k9x2q.npz.tmp").write_bytes(b"half a checkpoint")  # what a kill -9 mid-save leaves

    status, _, err = run_cli(*train_args(run, 3, "--resume"))
    assert status == 0, err
    assert [int(r["epoch"]) for r in metrics_rows(run)] == [1, 2, 3]
    assert not list(run.glob("*.tmp"))
    status, _, err = run_cli(*train_args(tmp_path / "straight", 3))
    assert status == 0, err
    assert_same_weights(run / "last.npz", tmp_path / "straight" / "last.npz")
    assert metrics_rows(run)[0]["val_miou"] == metrics_rows(tmp_path / "straight")[0]["val_miou"]


def test_nan_loss_stops_with_epoch_step_and_lr_and_keeps_last_checkpoint(run_cli, tmp_path, monkeypatch,
                                                                          no_figures):
    bad_epoch, bad_step, epochs = 2, 3, 2
    run = tmp_path / "run"
    real_batches = train_module.iterate_batches
    epochs_started = []
    snapshot = {}

    def poisoned_batches(data, batch_size, shuffle, rng, augment=False, drop_last=False, shard=None):
        batches = real_batches(data, batch_size, shuffle, rng, augment=augment, drop_last=drop_last, shard=shard)
        if not shuffle:  # validation / previews
            return batches
        epochs_started.append(len(epochs_started) + 1)
        epoch = epochs_started[-1]
        if epoch == bad_epoch:  # epoch 1 has ended: remember its checkpoint exactly
            snapshot["bytes"] = (run / "last.npz").read_bytes()
            snapshot["metrics"] = (run / "metrics.csv").read_bytes()

        def gen():
            for step, (x, y, names) in enumerate(batches, 1):
                if epoch == bad_epoch and step == bad_step:
                    x = np.full_like(x, np.nan)  # NaN input -> NaN loss, like a diverging run
                yield x, y, names
        return gen()

    monkeypatch.setattr(train_module, "iterate_batches", poisoned_batches)
    status, _, err = run_cli(*train_args(run, epochs))
    assert status != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    step = (bad_epoch - 1) * STEPS_PER_EPOCH + bad_step - 1
    lr = 0.5 * 1e-3 * (1 + math.cos(math.pi * step / (STEPS_PER_EPOCH * epochs)))  # cosine, default --lr
    assert f"epoch {bad_epoch}," in err and f"step {bad_step}/{STEPS_PER_EPOCH}" in err
    assert f"learning rate {lr:.3g}" in err
    assert "nan" in err.lower() and "--resume" in err
    # epoch 1's checkpoint and metrics are untouched and still load
    assert (run / "last.npz").read_bytes() == snapshot["bytes"]
    assert (run / "metrics.csv").read_bytes() == snapshot["metrics"]
    assert meta_of(run / "last.npz")["epoch"] == 1
    assert [int(r["epoch"]) for r in metrics_rows(run)] == [1]


def test_too_few_images_for_a_batch_is_an_error(run_cli, tmp_path):
    run = tmp_path / "run"
    status, _, err = run_cli("train", *TINY, "--num-shapes", "4", "--epochs", "1", "--out", run)
    assert status == 2 and "--batch-size" in err and "Traceback" not in err
    assert not run.exists()  # nothing half-made to --force away afterwards


def test_out_is_a_file(run_cli, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    status, _, err = run_cli(*train_args(target, 1))
    assert status == 2 and "not a folder" in err
    assert target.read_text() == "mine"


@pytest.mark.parametrize("extra, message", [
    (["--size", "34"], "--size 34 is not divisible by 2**depth = 4"),
    (["--size", "8"], "at least 16"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--scale", "0"], "--scale (the smallest crop's share of the area) must be in (0, 1]"),
    (["--rotate", "-5"], "--rotate (degrees) must be in [0, 180]"),
    (["--saturation", "1"], "--saturation must be in [0, 1)"),
])
def test_invalid_settings_are_one_line_errors(run_cli, tmp_path, extra, message):
    run = tmp_path / "run"
    status, _, err = run_cli(*train_args(run, 1), *extra)
    assert status == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_resume_of_a_finished_run_changes_nothing_unless_epochs_grow(run_cli, tmp_path, no_figures):
    run = tmp_path / "run"
    assert run_cli(*train_args(run, 2))[0] == 0
    before = (run / "last.npz").read_bytes()
    args = ["train", *TINY, "--out", run, "--resume"]  # no --epochs: the run's own 2, not the default 3
    status, _, err = run_cli(*args)
    assert status == 0, err
    assert (run / "last.npz").read_bytes() == before
    assert [int(r["epoch"]) for r in metrics_rows(run)] == [1, 2]
    status, _, err = run_cli(*args, "--epochs", "3")  # an explicit, larger --epochs extends it
    assert status == 0, err
    assert [int(r["epoch"]) for r in metrics_rows(run)] == [1, 2, 3]
    assert meta_of(run / "last.npz")["config"]["epochs"] == 3


def test_predictions_png_shows_validation_images_spread_over_the_set(run_cli, tmp_path, monkeypatch):
    """The preview's 4 images are spread over the validation set (the first 4 of a sorted pets split
    would be one breed): of the 8 validation shapes, numbers 0, 2, 4 and 6."""
    import tinyunet.viz

    shown = []
    monkeypatch.setattr(tinyunet.viz, "plot_curves", lambda *a, **k: None)
    monkeypatch.setattr(tinyunet.viz, "plot_predictions", lambda *a, names=None, **k: shown.append(list(names)))
    status, _, err = run_cli(*train_args(tmp_path / "run", 1))
    assert status == 0, err
    assert shown == [[f"shapes_{i:05d}" for i in (0, 2, 4, 6)]]


def test_a_run_folder_is_held_by_one_training_at_a_time(run_cli, cli_env, tmp_path, no_figures):
    """A second training into a folder in use (started alongside, or with --force) is refused with a
    message that names the holder, and changes nothing; once the holder is killed with kill -9, the
    folder is free at once (the lock dies with the process) and --resume continues the run."""
    run = tmp_path / "run"
    args = ["train", *TINY, "--num-shapes", "160", "--epochs", "20", "--out", str(run)]
    child = subprocess.Popen([sys.executable, "-m", "tinyunet.cli", *args], env=cli_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.npz").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read()
        before = {p.name for p in run.iterdir()}
        for extra in ([], ["--force"], ["--resume"]):
            status, out, err = run_cli(*args, *extra)
            assert status == 2, (extra, out, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert f"run folder {run} is in use by another training" in err
            assert f"process {child.pid} " in err and f"tinyunet train {TINY[0]}" in err, err
        assert {"config.json", "last.npz"} <= {p.name for p in run.iterdir()}
        assert before <= {p.name for p in run.iterdir()}  # --force deleted nothing
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stderr.close()
    epoch = meta_of(run / "last.npz")["epoch"]
    assert epoch < 20, "the first training ended before it was killed: nothing was tested"
    status, out, err = run_cli(*args, "--resume")
    assert status == 0, err
    assert f"resuming {run} after epoch {epoch}" in out
    assert [int(r["epoch"]) for r in metrics_rows(run)] == list(range(1, 21))
    assert not (run / ".lock").exists()  # a training that ends lets go of the folder


def test_a_failed_start_leaves_no_folder_and_no_lock(run_cli, tmp_path):
    run = tmp_path / "new"
    status, _, err = run_cli("train", *TINY, "--num-shapes", "4", "--epochs", "1", "--out", run)
    assert status == 2
    assert not run.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    status, _, err = run_cli("train", *TINY, "--num-shapes", "4", "--epochs", "1", "--out", existing, "--force")
    assert status == 2
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


# --- settings refused before work starts (issue 24, item 4) ----------------------------------------


def test_a_model_that_cannot_fit_in_memory_is_refused_before_it_starts(cli_env, tmp_path):
    """`--depth 12 --size 4096` once ran until the kernel killed it at 23 GB. Here the child may map
    4 GB (ulimit -v): today's refusal names the settings, their needs and a change that fits, in one
    line, before anything big is allocated (without the check: a MemoryError traceback)."""
    import resource

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    run = tmp_path / "run"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tinyunet.cli", "train", "--dataset", "shapes", "--num-shapes", "8",
                             "--depth", "12", "--size", "4096", "--out", str(run)], env=cli_env, capture_output=True,
                            text=True, timeout=300, preexec_fn=limit_memory)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    line = result.stderr.strip()
    assert "--depth 12 --size 4096 --batch-size 8 needs about" in line and "GB is available: use --depth" in line
    assert time.monotonic() - started < 60
    assert not run.exists()


def test_memory_estimate_agrees_with_the_measured_activations_and_parameters():
    """The estimate scales a small copy of the model; tinyunet summary measures the real one (a
    training-mode forward at the real size, every array the layers keep for backward added up)."""
    from tinyunet.memory import estimate_training_memory
    from tinyunet.models import create_model
    from tinyunet.summary import summarize
    from tinyunet.train import TrainConfig

    for arch in ("unet", "resunet", "attunet"):
        config = TrainConfig(dataset="shapes", arch=arch, base_channels=24, depth=5, size=64, batch_size=2)
        model = create_model(**config.model_kwargs())
        measured = sum(row.saved_bytes for row in summarize(model, (2, 3, 64, 64)))
        estimate = estimate_training_memory(config, 10)
        assert estimate.activations == pytest.approx(measured, rel=0.05), arch
        assert estimate.parameters == pytest.approx(model.num_parameters(), rel=0.01), arch
        assert estimate.weights == 16 * estimate.parameters and estimate.data == 10 * 64 * 64 * 4


def test_the_change_the_memory_error_suggests_fits_and_trains(run_cli, tmp_path, monkeypatch, no_figures):
    import tinyunet.memory

    monkeypatch.setattr(tinyunet.memory, "available_memory", lambda: 40_000_000)  # 40 MB
    args = ["train", "--dataset", "shapes", "--size", "128", "--num-shapes", "32", "--base-channels", "8",
            "--depth", "2", "--batch-size", "16", "--epochs", "1", "--quiet"]
    status, _, err = run_cli(*args, "--out", tmp_path / "run")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "but 40 MB is available: use --batch-size " in err
    fix = err.split("use ")[-1].split(" (about")[0].split()
    status, out, err = run_cli(*args, *fix, "--out", tmp_path / "run")
    assert status == 0, err
    assert (tmp_path / "run" / "last.npz").is_file()


def test_too_few_images_get_advice_that_works(run_cli, make_pets_root, write_example, write_split_file, tmp_path,
                                              no_figures):
    """A 1-image dataset used to be told to raise --val-fraction, which cannot help: it needs a
    second image. Each refusal's advice, followed, trains."""
    tiny_pets = ["--size", "32", "--base-channels", "4", "--depth", "2", "--epochs", "1", "--quiet"]
    root = make_pets_root(n_trainval=1, n_test=1)
    status, _, err = run_cli("train", "--data", root, *tiny_pets, "--batch-size", "1", "--out", tmp_path / "a")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "only 1 usable image" in err and "at least 2" in err and "add images" in err
    assert "--val-fraction" not in err
    write_example(root, "Cat_1", seed=1)
    write_split_file(root, "trainval", ["Cat_0", "Cat_1"])
    status, out, err = run_cli("train", "--data", root, *tiny_pets, "--batch-size", "1", "--out", tmp_path / "a")
    assert status == 0, err
    assert "data: 1 training and 1 validation images" in out

    status, _, err = run_cli("train", "--data", root, *tiny_pets, "--batch-size", "1", "--val-fraction", "0.9",
                             "--out", tmp_path / "b")
    assert status == 2 and "none is left to train on: use e.g. --val-fraction 0.1" in err
    status, _, err = run_cli("train", "--data", root, *tiny_pets, "--batch-size", "1", "--val-fraction", "0",
                             "--out", tmp_path / "b")
    assert status == 2 and "holds out no validation images: use e.g. --val-fraction 0.1" in err
    status, _, err = run_cli("train", "--data", root, *tiny_pets, "--batch-size", "1", "--val-fraction", "0.1",
                             "--out", tmp_path / "b")
    assert status == 0, err

    status, _, err = run_cli("train", *TINY, "--num-shapes", "5", "--epochs", "1", "--out", tmp_path / "c")
    assert status == 2 and "only 5 training images, fewer than --batch-size 8: use --batch-size 5" in err
    status, _, err = run_cli("train", *TINY, "--num-shapes", "5", "--epochs", "1", "--batch-size", "5",
                             "--out", tmp_path / "c")
    assert status == 0, err


# --- errors that say what they mean (issue 24, item 5) ---------------------------------------------


def test_a_full_disk_while_saving_says_which_file_and_resume_continues(run_cli, tmp_path, monkeypatch, no_figures):
    """The disk fills up while last.npz of epoch 2 is being written (np.savez writes part of it, then
    ENOSPC): the error names the file, says epoch 1's checkpoint is intact and that --resume
    continues; it does, to the same weights as a run that never failed."""
    import errno

    import tinyunet.checkpoint

    real_savez = np.savez

    def disk_fills_up(file, **arrays):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_save = train_module.save_checkpoint

    def save(path, model_state, optim_state, meta):
        full = Path(path).name == "last.npz" and meta["epoch"] == 2
        monkeypatch.setattr(tinyunet.checkpoint.np, "savez", disk_fills_up if full else real_savez)
        try:
            real_save(path, model_state, optim_state, meta)
        finally:
            monkeypatch.setattr(tinyunet.checkpoint.np, "savez", real_savez)

    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    status, _, err = run_cli(*train_args(run, 3))
    assert status == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"could not write {run / 'last.npz'} (No space left on device)" in err
    assert f"the last checkpoint {run / 'last.npz'} (epoch 1) is intact" in err
    assert "free some space and run again with --resume" in err
    assert meta_of(run / "last.npz")["epoch"] == 1
    assert not list(run.glob("*.tmp"))

    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    status, out, err = run_cli(*train_args(run, 3, "--resume"))
    assert status == 0, err
    assert f"resuming {run} after epoch 1" in out
    assert [int(r["epoch"]) for r in metrics_rows(run)] == [1, 2, 3]
    status, _, err = run_cli(*train_args(tmp_path / "straight", 3))
    assert status == 0, err
    assert_same_weights(run / "last.npz", tmp_path / "straight" / "last.npz")


@pytest.mark.filterwarnings("ignore:skipped 4 of 4 examples")
def test_rgb_trimaps_get_advice_about_the_trimaps_not_a_download(run_cli, make_pets_root, tmp_path):
    root = make_pets_root(n_trainval=4, n_test=1)
    for path in (root / "annotations" / "trimaps").iterdir():
        with Image.open(path) as trimap:
            trimap.convert("RGB").save(path)  # what an image editor makes of a trimap
    status, _, err = run_cli("train", "--data", root, "--size", "32", "--depth", "2", "--base-channels", "4",
                             "--epochs", "1", "--quiet", "--out", tmp_path / "run")
    assert status == 2
    error = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(error) == 1 and "Traceback" not in err, err
    assert "no usable examples among 4" in error[0]
    assert "trimap is RGB with 3 channels, expected one channel of the values 1, 2, 3" in error[0]
    assert "fix these files" in error[0] and "tinyunet download" not in error[0]
    # where files are missing, a download is the fix, and it is still offered
    for path in (root / "images").iterdir():
        path.unlink()
    status, _, err = run_cli("train", "--data", root, "--size", "32", "--depth", "2", "--base-channels", "4",
                             "--epochs", "1", "--quiet", "--out", tmp_path / "run")
    assert status == 2 and "image missing" in err and "tinyunet download" in err


def test_resume_with_data_on_a_shapes_run_says_that_shapes_read_no_folder(run_cli, tmp_path, make_pets_root,
                                                                          no_figures):
    run = tmp_path / "run"
    assert run_cli(*train_args(run, 1))[0] == 0
    root = make_pets_root()
    with pytest.warns(UserWarning) as record:
        status, out, err = run_cli("train", "--out", run, "--resume", "--epochs", "2", "--data", root)
    assert status == 0, err
    assert f"reading the data from" not in out
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and f"data {str(root)!r} (the run trains on synthetic shapes" in messages[0]
    assert json.loads((run / "config.json").read_text())["data"] is None
    assert [int(r["epoch"]) for r in metrics_rows(run)] == [1, 2]


# --- tests the mutation audit found missing (issue 24, item 7) -------------------------------------


def independent_model(checkpoint: Path):
    """The model of a checkpoint rebuilt from its raw arrays, in eval mode (BatchNorm's running statistics)."""
    from tinyunet.models import UNet

    with np.load(checkpoint, allow_pickle=False) as z:
        c = json.loads(str(z["meta"][()]))["config"]
        state = {k[len("model/"):]: z[k] for k in z.files if k.startswith("model/")}
    model = UNet(in_channels=3, num_classes=3, base_channels=c["base_channels"], depth=c["depth"],
                 batchnorm=c["batchnorm"])
    model.load_state_dict(state)
    model.eval()
    return model


def test_logged_validation_matches_an_independent_evaluation_of_the_saved_checkpoint(run_cli, tmp_path, no_figures):
    """metrics.csv's val_miou and val_loss of the last epoch against last.npz evaluated here: its own
    forward in eval mode, a confusion matrix by np.bincount, cross-entropy by log-sum-exp in float64.
    25 validation images go in batches of 16 and 9: a mean of batch means would differ; a validation
    forgetting eval() would use batch statistics (and leak them into the checkpoint)."""
    from tinyunet.data import make_shapes

    run = tmp_path / "run"
    status, _, err = run_cli(*train_args(run, 2, "--num-shapes", "200", "--lr", "0.01"))
    assert status == 0, err
    row = metrics_rows(run)[-1]
    val = make_shapes(25, 32, seed=10_000)  # the run's validation shapes: max(200 // 8, 8), seed + 10000
    images = ((val.images / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32)
    logits = np.asarray(independent_model(run / "last.npz").forward(images.transpose(0, 3, 1, 2)), np.float64)
    truth = val.labels.astype(np.int64)
    pred = logits.argmax(axis=1)
    confusion = np.bincount(3 * truth.ravel() + pred.ravel(), minlength=9).reshape(3, 3)
    iou = np.diag(confusion) / (confusion.sum(axis=0) + confusion.sum(axis=1) - np.diag(confusion))
    assert len(np.unique(pred)) > 1, "one class everywhere: a weak check"
    assert float(row["val_miou"]) == pytest.approx(np.nanmean(iou), abs=2e-6)
    top = logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    picked = np.take_along_axis(logits, truth[:, None], axis=1)[:, 0]
    assert float(row["val_loss"]) == pytest.approx(np.mean(log_sum - picked), rel=1e-5)


def test_every_epoch_has_its_own_order_and_flips(run_cli, tmp_path, monkeypatch, no_figures):
    """Shuffling and flips come from a generator seeded with (seed, epoch): epoch 2 must not replay
    epoch 1's order and flips (and the same run again replays both exactly)."""
    real_batches = train_module.iterate_batches
    seen = []  # per epoch: [(name, image bytes as the network got it)]

    def recording(data, batch_size, shuffle, rng, augment=False, drop_last=False, shard=None):
        batches = real_batches(data, batch_size, shuffle, rng, augment=augment, drop_last=drop_last, shard=shard)
        if not shuffle:
            return batches
        epoch = []
        seen.append(epoch)

        def gen():
            for x, y, names in batches:
                epoch.extend((name, x[i].tobytes()) for i, name in enumerate(names))
                yield x, y, names
        return gen()

    monkeypatch.setattr(train_module, "iterate_batches", recording)
    for name in ("a", "b"):
        assert run_cli(*train_args(tmp_path / name, 2))[0] == 0
    first, second, again = seen[0], seen[1], seen[2]
    assert [n for n, _ in first] != [n for n, _ in second], "epoch 2 visits the images in epoch 1's order"
    pictures = {n: p for n, p in first}
    assert sum(pictures[n] != p for n, p in second if n in pictures) > 0, "epoch 2 flips exactly epoch 1's images"
    assert again == first  # the same seed and epoch: the same order and flips


def test_augmentation_and_loss_reach_the_batches_and_the_loss(run_cli, tmp_path, monkeypatch, no_figures):
    seen = {}
    real_batches = train_module.iterate_batches

    def spy(data, batch_size, shuffle, rng, augment=False, drop_last=False, shard=None):
        if shuffle:
            seen["augment"] = augment
        return real_batches(data, batch_size, shuffle, rng, augment=augment, drop_last=drop_last, shard=shard)

    monkeypatch.setattr(train_module, "iterate_batches", spy)
    status, _, err = run_cli(*train_args(tmp_path / "a", 1, *EVERY_TRANSFORM, "--no-flip", "--loss", "dice"))
    assert status == 0, err
    assert seen["augment"] == Augmentation(flip=False, scale=0.6, rotate=15, brightness=0.2, contrast=0.2,
                                           saturation=0.2)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["loss"] == "dice"
    status, _, err = run_cli(*train_args(tmp_path / "b", 1, *EVERY_TRANSFORM, "--no-augment"))
    assert status == 0, err
    assert seen["augment"] is False
    assert not (tmp_path / "b" / "augmentations.png").exists()


def test_a_run_saved_before_the_new_transforms_keeps_flips_and_cross_entropy():
    old = {"dataset": "pets", "size": 128, "epochs": 10, "augment": True, "seed": 0}  # no flip/scale/.../loss keys
    config = train_module.TrainConfig.from_dict(old)
    assert config.augmentation() == Augmentation() and config.loss == "ce"


def test_pets_runs_get_the_pets_recipe_where_no_option_is_given(run_cli, make_pets_root, tmp_path, no_figures):
    root = make_pets_root(n_trainval=10, n_test=1)
    status, _, err = run_cli("train", "--data", root, "--size", "16", "--depth", "2", "--base-channels", "4",
                             "--batch-size", "4", "--epochs", "1", "--quiet", "--out", tmp_path / "run")
    assert status == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    recipe = {k: v for k, v in train_module.PETS_RECIPE.items() if k not in ("size", "epochs")}
    assert {k: config[k] for k in recipe} == recipe


def test_best_is_the_highest_validation_score_and_a_resume_remembers_it(run_cli, tmp_path, monkeypatch, no_figures):
    """Validation scores scripted as 0.3, 0.5 (epochs 1-2), then, resumed, 0.4 (epoch 3): best.npz must be
    epoch 2's weights with best_miou 0.5 after both runs (the lowest score, or a resume that forgot the best,
    would pick another epoch)."""
    real = train_module.evaluate_model
    scripted = []

    def scored(*args, **kwargs):
        result = real(*args, **kwargs)
        result["miou"] = scripted.pop(0)
        return result

    monkeypatch.setattr(train_module, "evaluate_model", scored)
    run = tmp_path / "run"
    scripted[:] = [0.3, 0.5]
    assert run_cli(*train_args(run, 2))[0] == 0
    epoch_2 = read_npz(run / "last.npz")
    best = meta_of(run / "best.npz")
    assert (best["epoch"], best["best_miou"]) == (2, 0.5)
    scripted[:] = [0.4]
    assert run_cli(*train_args(run, 3, "--resume"))[0] == 0
    assert scripted == [] and meta_of(run / "last.npz")["epoch"] == 3
    best, weights = meta_of(run / "best.npz"), read_npz(run / "best.npz")
    assert (best["epoch"], best["best_miou"]) == (2, 0.5)
    assert all(np.array_equal(weights[k], epoch_2[k]) for k in epoch_2 if k.startswith("model/"))


def test_another_seed_another_order(run_cli, tmp_path, monkeypatch, no_figures):
    """The shuffling follows the seed, not only the epoch: --seed 0 and --seed 1 visit the training images
    in different orders in epoch 1 (and the same seed twice in the same order)."""
    real_batches = train_module.iterate_batches
    orders = []

    def recording(data, batch_size, shuffle, rng, augment=False, drop_last=False, shard=None):
        batches = list(real_batches(data, batch_size, shuffle, rng, augment=augment, drop_last=drop_last, shard=shard))
        if shuffle:
            orders.append([name for _, _, names in batches for name in names])
        return iter(batches)

    monkeypatch.setattr(train_module, "iterate_batches", recording)
    for name, seed in (("a", "0"), ("b", "1"), ("c", "0")):
        assert run_cli(*train_args(tmp_path / name, 1, "--seed", seed))[0] == 0
    assert sorted(orders[0]) == sorted(orders[1])       # the same images (the data follows the seed too)
    assert orders[0] != orders[1] and orders[0] == orders[2]


def test_logged_train_loss_is_the_mean_of_the_steps_losses(run_cli, tmp_path, monkeypatch, no_figures):
    """metrics.csv's train_loss of each epoch is the mean of that epoch's step losses (equal batches), as
    recorded from the loss itself at every step."""
    real_make_loss = train_module.make_loss
    recorded = []

    def recording_loss(*args, **kwargs):
        loss = real_make_loss(*args, **kwargs)
        forward = loss.forward

        def logged(logits, target):
            value = forward(logits, target)
            recorded.append(float(value))
            return value
        loss.forward = logged
        return loss

    monkeypatch.setattr(train_module, "make_loss", recording_loss)   # the training loss (validation makes its own)
    run = tmp_path / "run"
    assert run_cli(*train_args(run, 2))[0] == 0
    assert len(recorded) == 2 * STEPS_PER_EPOCH
    for epoch, row in enumerate(metrics_rows(run)):
        steps = recorded[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH]
        assert float(row["train_loss"]) == pytest.approx(np.mean(steps), rel=1e-5)


def test_the_learning_rate_of_every_step(run_cli, tmp_path, monkeypatch, no_figures):
    """The cosine schedule over the run's steps: 52 images in batches of 8 are 6 steps an epoch (the last
    partial batch of 4 dropped), 12 in two epochs; step k trains at 0.5 lr (1 + cos(pi k / 12)), written out
    here."""
    from tinyunet.optim import Adam

    rates = []
    real_step = Adam.step
    monkeypatch.setattr(Adam, "step", lambda self: rates.append(self.lr) or real_step(self))
    run = tmp_path / "run"
    assert run_cli(*train_args(run, 2, "--lr", "0.01", "--num-shapes", "52"))[0] == 0
    expected = [0.5 * 0.01 * (1 + math.cos(math.pi * k / 12)) for k in range(12)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert [float(r["lr"]) for r in metrics_rows(run)] == pytest.approx([0.005, 0.0], abs=1e-9)


def test_evaluate_scores_shapes_that_training_never_saw(run_cli, tmp_path, monkeypatch, no_figures):
    """A shapes checkpoint is evaluated on held-out shapes: no image of the evaluation is one of training's
    or validation's (compared pixel for pixel, from the images each side generated)."""
    import tinyunet.data as data_module
    from tinyunet import evaluate as evaluate_module

    made = []
    real = data_module.make_shapes

    def recording(*args, **kwargs):
        data = real(*args, **kwargs)
        made.append(data)
        return data

    monkeypatch.setattr(train_module, "make_shapes", recording)
    run = tmp_path / "run"
    assert run_cli(*train_args(run, 1))[0] == 0
    seen = {image.tobytes() for data in made for image in data.images}
    made.clear()
    monkeypatch.setattr(evaluate_module, "make_shapes", recording)
    assert run_cli("evaluate", "--checkpoint", str(run / "best.npz"), "--quiet")[0] == 0
    assert len(made) == 1 and not seen & {image.tobytes() for image in made[0].images}
