"""Evaluate a checkpoint on a split: pixel accuracy, per-class IoU and Dice, confusion matrix."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from tinyunet.classes import CLASS_NAMES
from tinyunet.data import default_data_dir, load_native_labels, load_pets, make_shapes
from tinyunet.distributed import first_process_first
from tinyunet.errors import TinyUNetError
from tinyunet.train import TrainConfig, checkpoint_file, evaluate_model, load_model


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: Optional[str] = None, split: Optional[str] = None,
                        batch_size: int = 16, progress: bool = True, limit: Optional[int] = None,
                        native: bool = True, group: Optional[Any] = None, mirror: bool = False) -> Dict[str, Any]:
    """Metrics of the checkpoint's model on ``split`` of its dataset, at the size it was trained at.

    The dataset and the image size come from the checkpoint. Pets: ``split`` (default "test") of
    ``data`` (default: the folder it was trained on). Shapes: its own held-out synthetic images,
    which have no splits - or, when ``data`` is given, that Oxford-IIIT Pet folder.
    Returns pixel_accuracy, miou, iou/dice per class name, confusion, loss, num_images, size (the
    training size), what was scored: checkpoint (the file), data (the folder, or "held-out synthetic
    shapes"), split (None for shapes); for pets with ``native`` also "native": the same metrics at each
    photo's own size (the class probabilities resized back to it, as ``predict`` does, against the
    full-size trimap). ``group``: several processes (mpiexec) share the images; every one returns the
    metrics of all of them. ``mirror``: score the mean of the predictions for each image and its
    mirror image (test-time augmentation); the result says so under "mirror".
    """
    if batch_size < 1:
        raise TinyUNetError(f"--batch-size must be at least 1, got {batch_size}")
    checkpoint = checkpoint_file(checkpoint)
    model, meta = load_model(checkpoint)
    config = TrainConfig.from_dict(meta.get("config", {}))
    if config.dataset == "shapes" and data is None:
        if split is not None:
            raise TinyUNetError(f"this checkpoint was trained on synthetic shapes and is evaluated on its own "
                                f"held-out shapes, which have no --split {split}; pass --data to evaluate it "
                                "on an Oxford-IIIT Pet folder")
        dataset = make_shapes(max(config.num_shapes // 8, 8), config.size, seed=config.seed + 20_000)
        desc = root = "held-out synthetic shapes"
    else:
        split = split or "test"
        root = data or config.data or str(default_data_dir())
        dataset = first_process_first(group, lambda: load_pets(root, split, config.size, progress=progress,
                                                               limit=limit))
        desc = f"evaluate {split}"
        if native:
            labels = load_native_labels(root, dataset.names)
            result = evaluate_model(model, dataset, batch_size=batch_size, progress=progress, desc=desc,
                                    native_labels=labels, group=group, mirror=mirror)
            return {"checkpoint": str(checkpoint), "data": str(root), "split": split, **result, "size": config.size,
                    "mirror": mirror}
    result = evaluate_model(model, dataset, batch_size=batch_size, progress=progress, desc=desc, group=group,
                            mirror=mirror)
    return {"checkpoint": str(checkpoint), "data": str(root), "split": split, **result, "size": config.size,
            "mirror": mirror}


def _scores(result: Dict[str, Any], width: int) -> list:
    lines = [f"pixel accuracy: {result['pixel_accuracy']:.4f}",
             f"mean IoU:       {result['miou']:.4f}",
             f"mean Dice:      {result['mdice']:.4f}",
             "",
             f"{'class':<{width}}{'IoU':>8}{'Dice':>8}"]
    return lines + [f"{n:<{width}}{result['iou'][n]:>8.4f}{result['dice'][n]:>8.4f}" for n in CLASS_NAMES]


def format_report(result: Dict[str, Any]) -> str:
    """A human-readable table of the metrics (at the training size, then at the photos' own sizes
    when measured) and the confusion matrix at the training size."""
    width = max(len(n) for n in CLASS_NAMES) + 2
    size = f" ({result['size']}x{result['size']})" if "size" in result else ""
    lines = [f"checkpoint: {result['checkpoint']}",
             f"data: {result['data']}" + (f", split {result['split']}" if result.get("split") else ""),
             f"images: {result['num_images']}"
             + (", each scored as the mean of its prediction and its mirror image's" if result.get("mirror") else ""),
             "", f"at the training size{size}:"] + _scores(result, width)
    if "native" in result:
        lines += ["", "at each photo's own size (class probabilities resized back, as `predict` does):"]
        lines += _scores(result["native"], width)
    lines += ["", "confusion matrix at the training size (rows: true class, columns: predicted)",
              " " * width + "".join(f"{n:>{width + 2}}" for n in CLASS_NAMES)]
    lines += [f"{n:<{width}}" + "".join(f"{v:>{width + 2}}" for v in row)
              for n, row in zip(CLASS_NAMES, result["confusion"])]
    return "\n".join(lines)
