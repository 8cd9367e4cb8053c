"""`tinyunet evaluate` and `tinyunet predict` with a checkpoint trained on a tiny pets folder.

The metrics are checked against an independent computation: the model is rebuilt from the raw
``.npz`` here, the test photos are read and resized with Pillow directly, and accuracy / IoU / Dice
come from plain NumPy set arithmetic, without tinyunet's loader, metrics or load_model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_pet_example, write_split
from tinyunet.cli import main

SIZE = 32
NAMES = ("pet", "background", "outline")
TEST_NAMES = [f"dog_{i}" for i in range(4)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(pets root, checkpoint) of a 6-epoch run on 12 trainval photos; 4 test photos of mixed sizes.

    Long enough that the model predicts all three classes, so the metric check below means something.
    """
    from tinyunet.train import Trainer

    base = tmp_path_factory.mktemp("pets_run")
    root = base / "pets"
    trainval = [f"Cat_{i}" for i in range(12)]
    for i, name in enumerate(trainval + TEST_NAMES):
        write_pet_example(root, name, width=40 + 6 * (i % 4), height=30 + 5 * (i % 3), seed=i)
    write_split(root, "trainval", trainval)
    write_split(root, "test", TEST_NAMES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYUNET_CACHE", str(base / "cache"))
        mp.setenv("TINYUNET_BACKEND", "numpy")
        mp.setattr(Trainer, "_figures", lambda self, *args: None)  # matplotlib would be most of the time
        status = main(["train", "--dataset", "pets", "--data", str(root), "--size", str(SIZE), "--base-channels",
                       "4", "--depth", "2", "--batch-size", "4", "--epochs", "6", "--lr", "0.03", "--quiet",
                       # flips and cross-entropy only: 6 epochs on 12 photos are too few to learn from the
                       # pets recipe's harder, augmented images, and the model must predict all three classes
                       "--scale", "1", "--rotate", "0", "--brightness", "0", "--contrast", "0", "--saturation", "0",
                       "--loss", "ce", "--out", str(base / "run")])
    assert status == 0
    return root, base / "run" / "last.npz"


def independent_model(checkpoint: Path):
    """The model rebuilt from the raw npz: its config in meta, its arrays under model/."""
    from tinyunet.models import UNet

    with np.load(checkpoint, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"][()]))
        state = {k[len("model/"):]: z[k] for k in z.files if k.startswith("model/")}
    c = meta["config"]
    model = UNet(in_channels=3, num_classes=3, base_channels=c["base_channels"], depth=c["depth"],
                 batchnorm=c["batchnorm"])
    model.load_state_dict(state)
    model.eval()
    return model


def normalize(rgb: np.ndarray) -> np.ndarray:
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((rgb / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)


def load_test_split(root: Path):
    """(normalized photos (N, 3, S, S), true class ids (N, S, S)) of the test split, resized with Pillow."""
    images, truth = [], []
    for name in TEST_NAMES:
        with Image.open(root / "images" / f"{name}.jpg") as im:
            images.append(normalize(np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float64)))
        with Image.open(root / "annotations" / "trimaps" / f"{name}.png") as tm:
            truth.append(np.asarray(tm.resize((SIZE, SIZE), Image.NEAREST)).astype(np.int64) - 1)
    return np.stack(images), np.stack(truth)


def independent_predictions(root: Path, checkpoint: Path):
    """(true class ids, predicted class ids), each (N, S, S), for the test split."""
    images, truth = load_test_split(root)
    logits = np.asarray(independent_model(checkpoint).forward(images))
    return truth, logits.argmax(axis=1)


def test_evaluate_json_matches_independent_computation(trained, capsys, monkeypatch, tmp_path):
    root, checkpoint = trained
    monkeypatch.setenv("TINYUNET_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root), "--split", "test", "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert isinstance(result, dict)
    for key in ("pixel_accuracy", "miou", "iou", "dice", "num_images"):
        assert key in result
    assert set(result["iou"]) == set(result["dice"]) == set(NAMES)
    assert result["num_images"] == len(TEST_NAMES)

    truth, pred = independent_predictions(root, checkpoint)
    assert len(np.unique(pred)) == 3, "the tiny model predicts one class only: the check would be weak"
    assert result["pixel_accuracy"] == pytest.approx(np.mean(pred == truth), abs=1e-12)
    ious = {}
    for c, name in enumerate(NAMES):
        p = set(zip(*np.nonzero(pred == c)))  # the pixels (n, y, x) predicted as c
        t = set(zip(*np.nonzero(truth == c)))
        ious[name] = len(p & t) / len(p | t)
        assert result["iou"][name] == pytest.approx(ious[name], abs=1e-12), name
        assert result["dice"][name] == pytest.approx(2 * len(p & t) / (len(p) + len(t)), abs=1e-12), name
    assert result["miou"] == pytest.approx(np.mean(list(ious.values())), abs=1e-12)
    if "confusion" in result:
        expected = [[int(np.sum((truth == t) & (pred == p))) for p in range(3)] for t in range(3)]
        assert result["confusion"] == expected


def test_evaluate_loss_is_the_mean_cross_entropy_over_all_pixels(trained, capsys, monkeypatch, tmp_path):
    """4 test images in batches of 3 and 1: the loss is the mean over every pixel of every image, as
    computed here (log-sum-exp in float64), not a mean of the batches' means."""
    root, checkpoint = trained
    monkeypatch.setenv("TINYUNET_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root), "--json", "--batch-size", "3"]) == 0
    loss = json.loads(capsys.readouterr().out)["loss"]
    model = independent_model(checkpoint)
    images, truth = [], []
    for name in TEST_NAMES:
        with Image.open(root / "images" / f"{name}.jpg") as im:
            images.append(normalize(np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float64)))
        with Image.open(root / "annotations" / "trimaps" / f"{name}.png") as tm:
            truth.append(np.asarray(tm.resize((SIZE, SIZE), Image.NEAREST)).astype(np.int64) - 1)
    logits = np.asarray(model.forward(np.stack(images)), np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    picked = np.take_along_axis(logits, np.stack(truth)[:, None], axis=1)[:, 0]
    per_image = (log_sum - picked).mean(axis=(1, 2))
    assert np.ptp(per_image) > 0.01, "images of equal loss: a mean of batch means would not show"
    assert loss == pytest.approx(per_image.mean(), rel=1e-5)


def independent_native_predictions(root: Path, checkpoint: Path):
    """[(true class ids, predicted class ids)] at each test photo's own size: softmax of the logits,
    each class's probability map resized bilinearly by Pillow ("F" images), the most probable class."""
    model = independent_model(checkpoint)
    pairs = []
    for name in TEST_NAMES:
        with Image.open(root / "images" / f"{name}.jpg") as im:
            rgb = im.convert("RGB")
        x = normalize(np.asarray(rgb.resize((SIZE, SIZE), Image.BILINEAR), np.float64))[None]
        z = np.asarray(model.forward(x), np.float64)[0]
        probs = np.exp(z - z.max(axis=0)) / np.exp(z - z.max(axis=0)).sum(axis=0)
        big = [np.asarray(Image.fromarray(p.astype(np.float32), mode="F").resize(rgb.size, Image.BILINEAR))
               for p in probs]
        with Image.open(root / "annotations" / "trimaps" / f"{name}.png") as tm:
            truth = np.asarray(tm).astype(np.int64) - 1  # trimap 1, 2, 3 -> classes 0, 1, 2
        pairs.append((truth, np.argmax(big, axis=0)))
    return pairs


@pytest.mark.parametrize("batch_size", [16, 3])   # one batch; batches of 3 and 1 (each photo's own trimap)
def test_evaluate_native_resolution_matches_independent_computation(trained, capsys, monkeypatch, tmp_path,
                                                                    batch_size):
    root, checkpoint = trained
    monkeypatch.setenv("TINYUNET_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root), "--split", "test", "--json",
                 "--batch-size", str(batch_size)]) == 0
    result = json.loads(capsys.readouterr().out)
    native = result["native"]
    pairs = independent_native_predictions(root, checkpoint)
    sizes = {truth.shape for truth, _ in pairs}
    assert len(sizes) > 1 and (SIZE, SIZE) not in sizes  # photos of several sizes, none the training size
    truth = np.concatenate([t.ravel() for t, _ in pairs])
    pred = np.concatenate([p.ravel() for _, p in pairs])
    assert len(np.unique(pred)) == 3
    expected = [[int(np.sum((truth == t) & (pred == q))) for q in range(3)] for t in range(3)]
    assert sum(map(sum, native["confusion"])) == truth.size  # every full-size pixel counted once
    # a pixel whose two best classes tie within float32 rounding may go either way (batched forward)
    assert np.abs(np.array(native["confusion"]) - expected).sum() <= 2 * 1e-3 * truth.size
    ious = [expected[c][c] / (sum(expected[c]) + sum(row[c] for row in expected) - expected[c][c]) for c in range(3)]
    assert native["miou"] == pytest.approx(np.mean(ious), abs=2e-3)
    assert native["pixel_accuracy"] == pytest.approx(np.mean(pred == truth), abs=1e-3)
    assert native["miou"] != pytest.approx(result["miou"], abs=1e-6)  # a second score, not the first repeated
    assert result["size"] == SIZE


def test_evaluate_table(trained, capsys, monkeypatch, tmp_path):
    root, checkpoint = trained
    monkeypatch.setenv("TINYUNET_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root)]) == 0
    out = capsys.readouterr().out
    truth, pred = independent_predictions(root, checkpoint)
    assert f"pixel accuracy: {np.mean(pred == truth):.4f}" in out
    native = independent_native_predictions(root, checkpoint)
    miou = np.mean([np.sum((t == c) & (p == c)) / np.sum((t == c) | (p == c)) for c in range(3)
                    for t, p in [(np.concatenate([a.ravel() for a, _ in native]),
                                  np.concatenate([b.ravel() for _, b in native]))]])
    own_size = out.index("at each photo's own size")
    assert f"mean IoU:       {miou:.4f}" in out[own_size:]
    assert "confusion matrix" in out.lower()
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "confusion matrix" in line.lower())
    matrix = {}
    for line in lines[start + 1:]:
        parts = line.split()
        if parts and parts[0] in NAMES and len(parts) == 4:
            matrix[parts[0]] = [int(v) for v in parts[1:]]
    assert list(matrix) == list(NAMES)
    for t, name in enumerate(NAMES):
        assert matrix[name] == [int(np.sum((truth == t) & (pred == p))) for p in range(3)]
        assert any(line.startswith(name) and "IoU" not in line for line in lines[:start])


def write_inputs(folder: Path) -> dict:
    """Photos of several sizes and modes; returns {stem: (width, height)}."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    sizes = {}
    Image.fromarray(rng.integers(0, 256, (53, 37, 3), np.uint8)).save(folder / "a37x53.jpg")
    sizes["a37x53"] = (37, 53)
    Image.fromarray(rng.integers(0, 256, (64, 100, 3), np.uint8)).save(folder / "b100x64.png")
    sizes["b100x64"] = (100, 64)
    Image.fromarray(rng.integers(0, 256, (45, 45), np.uint8), mode="L").save(folder / "gray45.png")
    sizes["gray45"] = (45, 45)
    Image.fromarray(rng.integers(0, 256, (20, 30, 4), np.uint8), mode="RGBA").save(folder / "rgba30x20.png")
    sizes["rgba30x20"] = (30, 20)
    (folder / "notes.txt").write_text("not an image: ignored when a folder is given")
    return sizes


def test_predict_any_size_and_mode(trained, capsys, tmp_path):
    root, checkpoint = trained
    sizes = write_inputs(tmp_path / "in")
    # one photo at exactly the training size, given as a file next to the folder
    exact = root / "images" / f"{TEST_NAMES[0]}.jpg"
    square = tmp_path / "square.png"
    with Image.open(exact) as im:
        im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR).save(square)
    sizes["square"] = (SIZE, SIZE)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"), str(square), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}_{k}.png" for s in sizes for k in ("mask", "overlay"))
    for stem, size in sizes.items():
        with Image.open(out / f"{stem}_mask.png") as mask:
            assert mask.mode == "P" and mask.size == size
            ids = np.asarray(mask)
        assert set(np.unique(ids)) <= {0, 1, 2}
        with Image.open(out / f"{stem}_overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == size
    # at the training size nothing is resized: the mask is exactly the model's argmax
    with Image.open(square) as im:
        x = normalize(np.asarray(im.convert("RGB"), np.float64))[None]
    expected = np.asarray(independent_model(checkpoint).forward(x)).argmax(axis=1)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "square_mask.png")), expected)


def damaged_checkpoints(checkpoint: Path, folder: Path) -> dict:
    folder.mkdir()
    with np.load(checkpoint, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    paths = {}
    paths["random bytes"] = folder / "random.npz"
    paths["random bytes"].write_bytes(os.urandom(4096))
    paths["no meta"] = folder / "nometa.npz"
    np.savez(paths["no meta"], **{k: v for k, v in arrays.items() if k != "meta"})
    paths["shape changed"] = folder / "shape.npz"
    changed = dict(arrays)
    changed["model/head.weight"] = np.zeros((3, 5, 1, 1), np.float32)
    np.savez(paths["shape changed"], **changed)
    paths["truncated"] = folder / "truncated.npz"
    paths["truncated"].write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    paths["missing"] = folder / "missing.npz"
    return paths


EXPECTED_MESSAGE = {"random bytes": "not a tinyunet checkpoint", "no meta": "no 'meta' entry",
                    "shape changed": "head.weight", "truncated": "checkpoint", "missing": "not found"}


@pytest.mark.parametrize("damage", list(EXPECTED_MESSAGE))
def test_bad_checkpoint_is_a_one_line_error(trained, capsys, tmp_path, damage):
    root, checkpoint = trained
    bad = damaged_checkpoints(checkpoint, tmp_path / "bad")[damage]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photo)
    for argv in (["predict", "--checkpoint", str(bad), str(photo), "--out", str(tmp_path / "out")],
                 ["evaluate", "--checkpoint", str(bad), "--data", str(root), "--json"]):
        capsys.readouterr()
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = [line for line in captured.err.strip().splitlines() if "%|" not in line]
        assert len(lines) == 1 and "Traceback" not in captured.err
        assert str(bad) in lines[0] and EXPECTED_MESSAGE[damage] in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_predict_missing_input(trained, capsys, tmp_path):
    _, checkpoint = trained
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no such image" in err and str(tmp_path / "nope.jpg") in err and "Traceback" not in err


def test_predict_refuses_inputs_that_would_overwrite_each_other(trained, capsys, tmp_path):
    _, checkpoint = trained
    a, b = tmp_path / "one" / "cat.png", tmp_path / "two" / "cat.jpg"
    for path in (a, b):
        path.parent.mkdir()
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), str(a), str(b), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(a) in err and str(b) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_shapes_checkpoint_split_and_data(trained, tmp_path, monkeypatch, capsys):
    """A shapes checkpoint: its own held-out shapes by default; --split alone is an error (shapes have
    no splits) instead of being silently ignored; --data evaluates it on that pets folder."""
    from tinyunet.train import Trainer
    root, _ = trained
    monkeypatch.setenv("TINYUNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Trainer, "_figures", lambda self, *args: None)
    assert main(["train", "--dataset", "shapes", "--size", str(SIZE), "--num-shapes", "16", "--base-channels", "4",
                 "--depth", "2", "--batch-size", "8", "--epochs", "1", "--quiet", "--out", str(tmp_path / "run")]) == 0
    checkpoint = str(tmp_path / "run" / "last.npz")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", checkpoint, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 8      # max(16 // 8, 8) held-out shapes
    assert main(["evaluate", "--checkpoint", checkpoint, "--split", "trainval"]) == 2
    err = capsys.readouterr().err
    assert "no --split trainval" in err and "--data" in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", str(root), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == len(TEST_NAMES)


def test_a_run_folder_stands_for_its_best_checkpoint(trained, capsys, tmp_path):
    """--checkpoint <run folder> uses its best.npz (the file train's log points to); a folder with
    no checkpoint is a one-line error."""
    root, checkpoint = trained
    run = checkpoint.parent
    capsys.readouterr()
    outputs = []
    for given in (run / "best.npz", run):
        assert main(["evaluate", "--checkpoint", str(given), "--data", str(root), "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--checkpoint", str(empty), "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert "without best.npz or last.npz" in err and len(err.strip().splitlines()) == 1


def test_predict_skips_unreadable_images_with_one_warning(trained, capsys, tmp_path):
    _, checkpoint = trained
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as record:  # what the CLI prints as one "warning: ..." line
        assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(out)]) == 0
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 2 of 3 images" in message and "broken.jpg" in message and "empty.png" in message
    assert sorted(p.name for p in out.iterdir()) == ["good_mask.png", "good_overlay.png"]
    # --strict: the first unreadable image is the error; none readable: an error without --strict too
    assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(tmp_path / "o2"),
                 "--strict"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    (folder / "good.png").unlink()
    assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(tmp_path / "o3")]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "%|" not in line]  # no progress bar
    assert len(lines) == 1 and "none of the 2 images could be read" in lines[0]


def test_predict_out_that_is_a_file_is_a_one_line_error(trained, capsys, tmp_path):
    _, checkpoint = trained
    photo, taken = tmp_path / "photo.png", tmp_path / "taken.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photo)
    taken.write_bytes(b"somebody's file")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), str(photo), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert f"--out {taken} is a file" in err and len(err.strip().splitlines()) == 1
    assert taken.read_bytes() == b"somebody's file"


def independent_mirror_probabilities(model, x: np.ndarray) -> np.ndarray:
    """Mean of the softmax of model(x) and of model(x mirrored), the latter mirrored back; float64."""
    def softmax(z):
        z = np.asarray(z, np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    mirrored = np.flip(softmax(model.forward(np.ascontiguousarray(np.flip(x, axis=3)))), axis=3)
    return (softmax(model.forward(x)) + mirrored) / 2


def test_mirror_averaging_in_evaluate_and_predict_matches_independent_computation(trained, capsys, monkeypatch,
                                                                                  tmp_path):
    root, checkpoint = trained
    monkeypatch.setenv("TINYUNET_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root), "--split", "test", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root), "--split", "test", "--json",
                 "--mirror"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mirror"] is True and plain["mirror"] is False
    model = independent_model(checkpoint)
    images, truth = load_test_split(root)
    probs = independent_mirror_probabilities(model, images)
    pred = probs.argmax(axis=1)
    expected = [[int(np.sum((truth == t) & (pred == p))) for p in range(3)] for t in range(3)]
    assert np.abs(np.array(result["confusion"]) - expected).sum() <= 2   # ties within float32 rounding
    assert result["confusion"] != plain["confusion"]   # the mirror image changed some predictions
    # its loss: the mean cross-entropy of the averaged probabilities
    picked = np.take_along_axis(probs, truth[:, None], axis=1)
    assert result["loss"] == pytest.approx(-np.log(picked).mean(), rel=1e-4)
    # predict --mirror, on a photo of the training size (nothing resized): the argmax of the same mean
    square = tmp_path / "square.png"
    Image.fromarray(np.clip(np.rint((images[1].transpose(1, 2, 0) * [0.229, 0.224, 0.225]
                                     + [0.485, 0.456, 0.406]) * 255), 0, 255).astype(np.uint8)).save(square)
    with Image.open(square) as im:
        x = normalize(np.asarray(im.convert("RGB"), np.float64))[None]
    assert main(["predict", "--checkpoint", str(checkpoint), str(square), "--out", str(tmp_path / "out"),
                 "--mirror"]) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "square_mask.png"))
    np.testing.assert_array_equal(mask, independent_mirror_probabilities(model, x).argmax(axis=1)[0])


def test_evaluate_in_a_group_loads_the_split_before_the_others(trained, monkeypatch):
    """Under mpiexec, process 0 loads (and caches) the split before the others start: the barrier comes
    after its load. A one-process group whose sums are the identity gives the metrics of no group."""
    import tinyunet.evaluate as evaluate_module
    from tinyunet.evaluate import evaluate_checkpoint

    root, checkpoint = trained
    events = []

    class OneProcess:
        rank, size = 0, 1

        def barrier(self):
            events.append("barrier")

        def allreduce(self, array):
            return array

    real_load = evaluate_module.load_pets
    monkeypatch.setattr(evaluate_module, "load_pets", lambda *a, **k: (events.append("load"), real_load(*a, **k))[1])
    shared = evaluate_checkpoint(checkpoint, str(root), "test", progress=False, group=OneProcess())
    assert events == ["load", "barrier"]
    alone = evaluate_checkpoint(checkpoint, str(root), "test", progress=False)
    assert shared["miou"] == alone["miou"] and np.array_equal(shared["confusion"], alone["confusion"])


def test_a_shared_evaluation_reads_only_its_own_trimaps_one_batch_at_a_time(trained, monkeypatch, tmp_path):
    """Process 1 of 2 scores the second half of the test split (dog_2, dog_3) and reads only those full-size
    trimaps, each after the forward of its batch: the split's trimaps are never all in memory at once, nor
    read by every process."""
    from tinyunet.data import pets
    from tinyunet.data import load_native_labels, load_pets
    from tinyunet.train import evaluate_model, load_model

    root, checkpoint = trained
    monkeypatch.setenv("TINYUNET_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(checkpoint)
    data = load_pets(root, "test", SIZE, progress=False)
    assert data.names == TEST_NAMES
    events = []
    forward, open_image = model.forward, pets.Image.open
    monkeypatch.setattr(model, "forward", lambda x: events.append(("forward", len(x))) or forward(x))
    monkeypatch.setattr(pets.Image, "open", lambda path, *a: events.append(("read", Path(path).stem)) or open_image(path, *a))

    class SecondOfTwo:   # the arithmetic of the sums is not under test here: each process keeps its own
        rank, size = 1, 2

        def allreduce(self, array):
            return array

    result = evaluate_model(model, data, batch_size=1, native_labels=load_native_labels(root, data.names),
                            group=SecondOfTwo())
    assert events == [("forward", 1), ("read", "dog_2"), ("forward", 1), ("read", "dog_3")]
    assert sum(map(sum, result["native"]["confusion"])) == sum(
        np.asarray(Image.open(root / "annotations" / "trimaps" / f"{n}.png")).size for n in ("dog_2", "dog_3"))


def test_predict_labels_takes_the_most_probable_class_of_each_pixel():
    """predict_labels: the argmax over the class axis (1) of the model's logits, in eval mode, on the host;
    a stand-in model whose logits say class (row + column) % 3 at every pixel, and that notes its modes."""
    from tinyunet.train import predict_labels

    class Fixed:
        modes = []

        def eval(self):
            self.modes.append("eval")

        def train(self):
            self.modes.append("train")

        def forward(self, x):
            n, _, h, w = x.shape
            winner = (np.arange(h)[:, None] + np.arange(w)[None, :]) % 3
            logits = np.zeros((n, 3, h, w), np.float32)
            for c in range(3):
                logits[:, c][:, winner == c] = 5.0
            self.modes.append("forward")
            return logits

    model = Fixed()
    labels = predict_labels(model, np.zeros((2, 3, 4, 5), np.float32))
    assert labels.shape == (2, 4, 5)
    assert (labels == (np.arange(4)[:, None] + np.arange(5)[None, :]) % 3).all()
    assert model.modes == ["eval", "forward", "train"]
