"""The training loop: data -> model -> loss -> backward -> optimizer, epoch after epoch.

One step (see DESIGN.md): a host batch is copied to the device once; forward, loss, backward and the
optimizer step stay on the device; a single scalar (the loss) comes back for the progress bar and the
NaN check.

Everything a run produces goes into its run folder::

    RUNDIR/config.json    the configuration (resume reads it back)
    RUNDIR/metrics.csv    one row per epoch: losses, pixel accuracy, mIoU, per-class IoU, lr, time
    RUNDIR/last.npz       weights + optimizer + epoch: enough to resume
    RUNDIR/best.npz       the same, for the epoch with the best validation mIoU
    RUNDIR/curves.png     loss and mIoU per epoch
    RUNDIR/predictions.png  image | true mask | predicted mask for fixed validation images
    RUNDIR/augmentations.png  training images and masks as they are, then randomly augmented

Determinism: every random choice of epoch ``e`` (shuffling, augmentation) comes from a generator seeded with
``(seed, e)``, and checkpoints are written only at epoch ends. So a run killed at any moment and
restarted with ``--resume`` replays the interrupted epoch exactly and ends with the same weights as a
run that was never interrupted.

Several processes (``mpiexec -n N``, a process ``group`` from tinyunet.distributed): every process
draws the same global batches and takes its shard of each; the losses, synchronized BatchNorm and the
gradients add up over the processes, so each takes the step one process would take on the whole
batch. Only process 0 writes the run folder and prints; every process reads it to resume.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from tinyunet import backend
from tinyunet.backend import to_device, to_host
from tinyunet.checkpoint import load_checkpoint, restore, save_checkpoint
from tinyunet.classes import CLASS_NAMES, NUM_CLASSES
from tinyunet.data import (SegmentationData, default_data_dir, iterate_batches, load_pets, make_shapes, read_split,
                           split_train_val)
from tinyunet.data.pets import spread_subset
from tinyunet.distributed import ProcessGroup, first_process_first, shard
from tinyunet.errors import CheckpointError, TinyUNetError, TrainingError
from tinyunet.data.transforms import Augmentation, augment, resize_probabilities
from tinyunet.losses import LOSSES, CrossEntropyLoss, make_loss, softmax
from tinyunet.memory import check_training_fits
from tinyunet.metrics import ConfusionMeter
from tinyunet.models import create_model
from tinyunet.nn.norm import SyncBatchNorm
from tinyunet.optim import Adam
from tinyunet.run_lock import LOCK_NAME, RunFolderLock

PREVIEW_IMAGES = 4  # validation images shown in predictions.png


@dataclass
class TrainConfig:
    dataset: str = "pets"  # "pets" (Oxford-IIIT Pet trimaps) or "shapes" (synthetic, no files)
    data: Optional[str] = None  # pets folder; None: $TINYUNET_DATA or the download folder
    arch: str = "unet"
    size: int = 128
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" (decays to 0 over the run, per step) or "constant"
    base_channels: int = 16
    depth: int = 4
    batchnorm: bool = True
    seed: int = 0
    val_fraction: float = 0.1
    augment: bool = True  # False: none of the transforms below
    # the transforms, each off at its neutral value (a run saved before they existed keeps flips only);
    # `tinyunet train` on pets sets PETS_RECIPE's instead
    flip: bool = True
    scale: float = 1.0  # smallest share of the area a random square crop keeps
    rotate: float = 0.0  # largest rotation, degrees
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    loss: str = "ce"  # "ce", "dice" or "ce+dice"
    sync_batchnorm: bool = True  # several processes: BatchNorm over all their images (SyncBatchNorm)
    limit: Optional[int] = None  # use only the first N trainval images (quick runs)
    num_shapes: int = 800  # synthetic training images (dataset "shapes")
    strict: bool = False

    def model_kwargs(self) -> Dict[str, Any]:
        return dict(arch=self.arch, in_channels=3, num_classes=NUM_CLASSES, base_channels=self.base_channels,
                    depth=self.depth, batchnorm=self.batchnorm)

    def augmentation(self) -> Optional[Augmentation]:
        """The training batches' random transforms (None: no augmentation)."""
        if not self.augment:
            return None
        return Augmentation(flip=self.flip, scale=self.scale, rotate=self.rotate, brightness=self.brightness,
                            contrast=self.contrast, saturation=self.saturation)

    def validate(self) -> None:
        """Raise TinyUNetError for settings that would otherwise fail mid-run with a traceback."""
        problems = []
        for name in ("size", "epochs", "batch_size", "base_channels", "depth", "num_shapes"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be at least 1, got {self.limit}")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not self.lr > 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        try:
            self.augmentation()
        except ValueError as exc:
            problems.append(f"--{str(exc)}")
        if self.loss not in LOSSES:
            problems.append(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.dataset == "shapes" and self.size < 16:
            problems.append(f"--size must be at least 16 for the shapes dataset, got {self.size}")
        factor = 2 ** max(self.depth, 0)
        if self.size >= 1 and self.size % factor:
            lo = max(factor, self.size // factor * factor)
            problems.append(f"--size {self.size} is not divisible by 2**depth = {factor} (each of the {self.depth} "
                            f"levels halves it): use e.g. {lo} or {lo + factor}")
        if problems:
            raise TinyUNetError("; ".join(problems))

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def accel_description() -> str:
    from tinyunet.accel import describe   # imported only where the acceleration runs
    return describe()


#: The recipe `tinyunet train` uses for pets where no option says otherwise (the README's Results
#: measure each ingredient: test mIoU 0.703 with flips only and 10 epochs, 0.752 with this (2 seeds),
#: 54 minutes of training on 2 idle cores)
PETS_RECIPE: Dict[str, Any] = {"size": 128, "epochs": 45, "scale": 0.6, "rotate": 15.0, "brightness": 0.2,
                               "contrast": 0.2, "saturation": 0.2, "loss": "ce+dice"}
#: ... and for the synthetic shapes.
SHAPES_RECIPE: Dict[str, Any] = {"size": 64, "epochs": 3}

AUGMENTATION_IMAGES = 4  # training images shown in augmentations.png, each in AUGMENTATION_VARIANTS draws
AUGMENTATION_VARIANTS = 4


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Cosine decay from ``lr`` to 0 over the run (a function of the global step: resumable)."""
    if config.schedule == "constant" or total_steps < 1:
        return config.lr
    return 0.5 * config.lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _num_images(config: TrainConfig) -> int:
    """How many images load_data will decode (0 where the pets split file cannot be read yet: the
    loader then says what is wrong)."""
    if config.dataset == "shapes":
        return config.num_shapes + max(config.num_shapes // 8, 8)
    try:
        names = read_split(config.data or str(default_data_dir()), "trainval")
    except TinyUNetError:
        return 0
    return len(names) if config.limit is None else min(config.limit, len(names))


def load_data(config: TrainConfig, progress: bool = True) -> Tuple[SegmentationData, SegmentationData]:
    """(train, val) host datasets for the configuration."""
    if config.dataset == "shapes":
        train = make_shapes(config.num_shapes, config.size, seed=config.seed)
        val = make_shapes(max(config.num_shapes // 8, 8), config.size, seed=config.seed + 10_000)
        return train, val
    if config.dataset != "pets":
        raise TinyUNetError(f"unknown dataset {config.dataset!r}: choose 'pets' or 'shapes'")
    root = config.data or str(default_data_dir())
    data = load_pets(root, "trainval", config.size, strict=config.strict, progress=progress, limit=config.limit)
    return split_train_val(data, config.val_fraction, seed=0)


def class_probabilities(model: Any, x: Any, mirror: bool = False) -> Any:
    """The model's class probabilities for the device batch x (N, 3, S, S) -> (N, C, S, S).

    ``mirror``: the mean of the probabilities of x and of x mirrored left-right (mirrored back) -
    test-time augmentation with the flips the model was trained on: the two predictions' errors
    are partly independent, so their mean is right more often (twice the forward passes)."""
    if not mirror:
        return softmax(model.forward(x))
    # the mirror image first, so that the model's last forward (e.g. attention maps) is that of x
    mirrored = softmax(model.forward(backend.xp.ascontiguousarray(x[..., ::-1])))[..., ::-1]
    return (softmax(model.forward(x)) + mirrored) / 2


def evaluate_model(model: Any, data: SegmentationData, batch_size: int = 16,
                   progress: bool = False, desc: str = "eval",
                   native_labels: Optional[Sequence[np.ndarray]] = None,
                   group: Optional[ProcessGroup] = None, mirror: bool = False) -> Dict[str, Any]:
    """Mean loss and segmentation metrics of ``model`` (in eval mode) over ``data``.

    ``native_labels``: each example's class ids at its photo's own size (``load_native_labels``);
    then ``result["native"]`` also holds the metrics of the predictions as ``predict`` makes them:
    the class probabilities resized back to that size (bilinear), the most probable class.
    ``group``: several processes share the work, each a contiguous part of ``data``; their confusion
    matrices and summed losses are added up, so every process returns the metrics of all of ``data``.
    ``mirror``: score the mean of the predictions for each image and its mirror image
    (:func:`class_probabilities`); the loss is then that of the mean probabilities.
    """
    if native_labels is not None and len(native_labels) != len(data):
        raise ValueError(f"{len(native_labels)} native label maps for {len(data)} images")
    num_images = len(data)
    if group is not None:
        part = shard(num_images, group.rank, group.size)
        data = data.subset(np.arange(num_images)[part])
        native_labels = None if native_labels is None else native_labels[part]
    model.eval()
    loss_fn = CrossEntropyLoss()
    meter = ConfusionMeter(NUM_CLASSES)
    native = ConfusionMeter(NUM_CLASSES)
    total = backend.xp.zeros((), dtype=backend.xp.float64)
    batches = iterate_batches(data, batch_size, shuffle=False, rng=None)
    for b, (x, y, _) in enumerate(tqdm(batches, total=math.ceil(len(data) / batch_size), desc=desc,
                                       disable=not progress, leave=False)):
        x, y = to_device(x), to_device(y)
        if mirror:   # log-probabilities are logits whose softmax is the mean (the floor keeps a 0 finite)
            probs = class_probabilities(model, x, mirror=True)
            logits = backend.xp.log(backend.xp.maximum(probs, backend.xp.finfo(probs.dtype).tiny))
        else:
            logits = model.forward(x)
        total += loss_fn.forward(logits, y) * x.shape[0]  # summed on the device: no sync per batch
        meter.update(logits, y)
        if native_labels is not None:
            for p, truth in zip(to_host(probs if mirror else softmax(logits)), native_labels[b * batch_size:(b + 1) * batch_size]):
                pred = resize_probabilities(p, *truth.shape).argmax(axis=0)
                native.update(to_device(pred[None]), to_device(truth[None]))
    model.train()
    if group is not None:  # every process's counts and losses, added up
        meter.sum_over_processes(group)
        native.sum_over_processes(group)
        group.allreduce(total)
    result = meter.compute()
    result["loss"] = float(total) / max(num_images, 1)
    result["num_images"] = num_images
    if native_labels is not None:
        result["native"] = native.compute()
    return result


def predict_labels(model: Any, x: np.ndarray) -> np.ndarray:
    """Host images batch (N, 3, S, S) float32 -> host class ids (N, S, S)."""
    model.eval()
    logits = model.forward(to_device(x))
    model.train()
    return to_host(logits.argmax(axis=1))


class Trainer:
    """Runs (or resumes) one training run in ``run_dir``."""

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False, force: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print,
                 explicit: Optional[Iterable[str]] = None, group: Optional[ProcessGroup] = None) -> None:
        """``explicit``: the names of the config fields the caller chose (the CLI passes the options
        given on its command line; None: all of them). On resume they are compared with the run's
        saved configuration: a larger ``epochs`` extends the run, ``data`` points to moved data, and
        any other difference is ignored with a warning. ``group``: the processes training together
        (mpiexec; None: this one alone)."""
        self.run_dir = Path(run_dir)
        self.group = group
        self.writer = group is None or group.rank == 0   # the process that writes files and prints
        self.progress = progress and self.writer
        self.log = log if self.writer else (lambda message: None)
        self.ended = False
        self.start_epoch = 0
        self.saved_epoch = 0  # the epoch last.npz holds (0: none yet)
        self.best_miou = -1.0
        last = self.run_dir / "last.npz"
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise TinyUNetError(f"run folder {self.run_dir} is a file, not a folder: choose another --out")
        # one training per run folder, from here to the end of fit() (run_lock.py): a second one,
        # started alongside or with --force, would mix its files with this one's
        self._created = not self.run_dir.exists()
        self._lock: Optional[RunFolderLock] = None
        if self.writer:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TinyUNetError(f"cannot create run folder {self.run_dir} ({exc.strerror or exc}): "
                                    "choose another --out") from exc
        try:
            if self.writer:
                self._lock = RunFolderLock(self.run_dir)
            self._setup(config, resume, force, explicit, last)
        except BaseException:
            self._let_go()
            raise

    def _setup(self, config: TrainConfig, resume: bool, force: bool, explicit: Optional[Iterable[str]],
               last: Path) -> None:
        if self.run_dir.is_dir() and self._run_files() and not (resume or force):
            raise TinyUNetError(f"run folder {self.run_dir} already exists and is not empty: "
                                f"pass --resume to continue it or --force to start it again")
        # --force deletes the old run only in fit(), once the data has loaded: a typo in --data must
        # not cost the user their previous run (nor leave a half-made folder that then needs --force)
        self.force = force and not resume
        self.resuming = resume and last.is_file()
        if self.resuming:
            saved = TrainConfig.from_dict(json.loads((self.run_dir / "config.json").read_text()))
            names = [f.name for f in fields(TrainConfig)] if explicit is None else list(explicit)
            config = self._resumed_config(saved, config, names)
        config.validate()
        if backend.name() == "numpy":  # host memory; a GPU's is not measured
            check_training_fits(config, _num_images(config))  # before the model is even built
        group = self.group
        if group is not None and config.batch_size < group.size:
            raise TinyUNetError(f"--batch-size {config.batch_size} is smaller than the {group.size} processes: each "
                                f"takes a share of every batch; use --batch-size {group.size} or more")
        self.config = config
        backend.seed(config.seed)
        self.model = create_model(**config.model_kwargs())
        if group is not None and config.sync_batchnorm:
            SyncBatchNorm.convert(self.model, group)
        self.optimizer = Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.loss_fn = make_loss(config.loss, group)
        if self.resuming:
            meta = restore(self.model, self.optimizer, last)
            self.start_epoch = self.saved_epoch = int(meta["epoch"])
            self.best_miou = float(meta.get("best_miou", -1.0))
            self.log(f"resuming {self.run_dir} after epoch {self.start_epoch} with its saved configuration "
                     f"(config.json)")
            if config.epochs > saved.epochs and config.schedule == "cosine" and self.start_epoch < config.epochs:
                # the cosine decay is a function of step / total steps: a longer run stretches it
                was = learning_rate(saved, self.start_epoch, saved.epochs)
                now = learning_rate(config, self.start_epoch, config.epochs)
                self.log(f"extending the run from {saved.epochs} to {config.epochs} epochs: the cosine schedule "
                         f"now decays over {config.epochs} epochs, so the learning rate continues at {now:.6g} "
                         f"(it was {was:.6g} after epoch {self.start_epoch})")  # as metrics.csv's lr column
        elif resume:  # e.g. killed before its first checkpoint, or a typo in --out: say so
            self.log(f"nothing to resume in {self.run_dir} (no last.npz): starting a new run")

    def _resumed_config(self, saved: TrainConfig, asked: TrainConfig, names: List[str]) -> TrainConfig:
        """The saved configuration, with a larger ``epochs`` and a new ``data`` folder taken from
        ``asked``; other fields in ``names`` that differ are ignored with a warning (a resumed run
        with another learning rate or architecture would be neither the old run nor a new one)."""
        changes: Dict[str, Any] = {}
        ignored = []
        for name in names:
            new, old = getattr(asked, name), getattr(saved, name)
            if new == old:
                continue
            if name == "data" and new is not None and saved.dataset == "shapes":
                ignored.append(f"data {new!r} (the run trains on synthetic shapes, which read no data folder)")
            elif (name == "epochs" and new > old) or (name == "data" and new is not None):
                changes[name] = new
            else:
                ignored.append(f"{name} {new!r} (the run's: {old!r})")
        if ignored:
            warnings.warn(f"resuming {self.run_dir} with its saved configuration, so these are ignored: "
                          f"{', '.join(ignored)}; to change them, start a new run (another --out, or --force)",
                          stacklevel=3)
        if "data" in changes:
            self.log(f"reading the data from {changes['data']} (the run's was {saved.data})")
        return replace(saved, **changes)

    def _run_files(self) -> List[Path]:
        """What the run folder holds, but the lock."""
        return [p for p in self.run_dir.iterdir() if p.name != LOCK_NAME]

    def _let_go(self, ended_before_start: bool = True) -> None:
        """Release the run folder; a folder this training created and never used is removed again
        (a failed start leaves nothing to --force away afterwards)."""
        self.ended = True
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if ended_before_start and self._created and self.writer:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if empty

    def _prepare_run_dir(self) -> None:
        """Empty the run folder with --force (all but the lock), and write config.json."""
        if not self.writer:
            return
        if self.force:
            for path in self._run_files():
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for stale in self.run_dir.glob("*.tmp"):  # temp files of a save interrupted by kill -9
            stale.unlink(missing_ok=True)
        self._writing("config.json", lambda: (self.run_dir / "config.json").write_text(
            json.dumps(asdict(self.config), indent=2) + "\n"))

    # --- files -----------------------------------------------------------------------------------
    def _read_metrics(self) -> List[Dict[str, str]]:
        path = self.run_dir / "metrics.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            # rows after the checkpoint's epoch belong to an interrupted attempt: drop them
            return [row for row in csv.DictReader(f) if int(row["epoch"]) <= self.start_epoch]

    def _write_metrics(self, rows: List[Dict[str, Any]]) -> None:
        path = self.run_dir / "metrics.csv"
        tmp = path.with_suffix(".csv.tmp")
        try:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _writing(self, name: str, write: Callable[[], None]) -> None:
        """Run ``write`` (which writes ``name`` into the run folder); a failure (a full disk, a folder
        made read-only) says which file, what of the run is safe and how to go on."""
        try:
            write()
        except OSError as exc:
            last = self.run_dir / "last.npz"
            fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
            safe = (f"the last checkpoint {last} (epoch {self.saved_epoch}) is intact: {fix} and run again with "
                    "--resume to continue from it" if self.saved_epoch else
                    f"no checkpoint was written yet: {fix} and run again with --force")
            raise TrainingError(f"could not write {self.run_dir / name} ({exc.strerror or exc}); {safe}") from exc

    def _meta(self, epoch: int, metrics: Dict[str, Any]) -> Dict[str, Any]:
        return {"epoch": epoch, "arch": self.config.arch, "config": asdict(self.config),
                "best_miou": self.best_miou, "metrics": metrics, "backend": backend.name()}

    # --- the loop --------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train from the start (or the resumed epoch) to the last epoch; the run folder is held until
        it returns or raises, and released then."""
        if self.ended:
            raise TinyUNetError(f"this training of {self.run_dir} has ended: start a new one")
        started = False
        try:
            train, val = self._load_data()
            self._check_data(train, val)
            self._prepare_run_dir()
            started = True
            return self._fit(train, val)
        finally:
            self._let_go(ended_before_start=not started)

    def _load_data(self) -> Tuple[SegmentationData, SegmentationData]:
        """load_data; with several processes, process 0 first (it may fill the data cache), then the others."""
        return first_process_first(self.group, lambda: load_data(self.config, progress=self.progress))

    def _check_data(self, train: SegmentationData, val: SegmentationData) -> None:
        """Refuse data a run cannot use, with a change that makes it usable."""
        config = self.config
        total = len(train) + len(val)
        if config.dataset == "pets" and total < 2:
            more = f" or a larger --limit than {config.limit}" if config.limit is not None else ""
            raise TinyUNetError(f"only {total} usable image{'' if total == 1 else 's'} in "
                                f"{config.data or default_data_dir()}: training needs at least 2, one to train on "
                                f"and one to validate: add images{more}")
        if len(val) == 0:  # pets with --val-fraction 0: any other fraction holds out at least one image
            raise TinyUNetError(f"--val-fraction {config.val_fraction:g} holds out no validation images: "
                                "use e.g. --val-fraction 0.1")
        if len(train) == 0:
            raise TinyUNetError(f"--val-fraction {config.val_fraction:g} holds out all {total} images for "
                                "validation, none is left to train on: use e.g. --val-fraction 0.1")
        if len(train) < config.batch_size:
            more = "--num-shapes" if config.dataset == "shapes" else "more images"
            raise TinyUNetError(f"only {len(train)} training images, fewer than --batch-size {config.batch_size}: "
                                f"use --batch-size {len(train)} (or {more})")

    def _fit(self, train: SegmentationData, val: SegmentationData) -> Dict[str, Any]:
        config = self.config
        self._augmentation_figure(train)
        self.log(f"data: {len(train)} training and {len(val)} validation images at {config.size}x{config.size}; "
                 f"model {config.arch} with {self.model.num_parameters():,} parameters; backend {backend.name()}; "
                 + (accel_description() if backend.accelerate() else "the reference layers (tinyunet/nn) alone")
                 + ("" if self.group is None else
                    f"; {self.group.size} processes, each {self._share()} images of every batch of "
                    f"{config.batch_size}, " + ("synchronized BatchNorm" if config.sync_batchnorm else
                                                "BatchNorm per process")))
        steps_per_epoch = max(len(train) // config.batch_size, 1)
        total_steps = steps_per_epoch * config.epochs
        rows = self._read_metrics()
        # spread over the validation set: its first images would all be one breed (sorted split files)
        preview = val.subset(np.array(spread_subset(list(range(len(val))), PREVIEW_IMAGES)))
        preview_x = next(iterate_batches(preview, len(preview), shuffle=False, rng=None))[0]
        result: Dict[str, Any] = {}
        for epoch in range(self.start_epoch + 1, config.epochs + 1):
            started = time.time()
            train_loss = self._train_epoch(train, epoch, steps_per_epoch, total_steps)
            seconds = time.time() - started
            if self.group is not None and not config.sync_batchnorm:
                self._average_running_statistics()
            result = evaluate_model(self.model, val, progress=self.progress, desc=f"validate {epoch}",
                                    group=self.group)
            row = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(result["loss"], 6),
                   "val_pixel_accuracy": round(result["pixel_accuracy"], 6), "val_miou": round(result["miou"], 6),
                   **{f"val_iou_{name}": round(result["iou"][name], 6) for name in CLASS_NAMES},
                   # 6 significant digits, like the other columns: not 0.0009045084971874737
                   "lr": float(f"{learning_rate(config, epoch * steps_per_epoch, total_steps):.6g}"),
                   "seconds": round(seconds, 1), "images_per_second": round(steps_per_epoch * config.batch_size / seconds, 2)}
            rows.append(row)
            improved = result["miou"] > self.best_miou
            if improved:
                self.best_miou = result["miou"]
            # last.npz last: a crash before it leaves last.npz one epoch behind, and --resume recomputes
            # that epoch, dropping its metrics row and rewriting best.npz identically. Writing last.npz
            # before metrics.csv would lose the epoch's row for good if killed in between.
            if self.writer:   # only process 0 writes: the others need no host copy of the state
                meta = self._meta(epoch, row)
                state, opt_state = self.model.state_dict(), self.optimizer.state_dict()
                self._writing("metrics.csv", lambda: self._write_metrics(rows))
                if improved:
                    self._writing("best.npz", lambda: save_checkpoint(self.run_dir / "best.npz", state, opt_state,
                                                                      meta))
                self._writing("last.npz", lambda: save_checkpoint(self.run_dir / "last.npz", state, opt_state, meta))
            self.saved_epoch = epoch
            if self.writer:
                self._writing("curves.png and predictions.png", lambda: self._figures(rows, preview, preview_x))
            self.log(f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f}, val loss {result['loss']:.4f}, "
                     f"pixel acc {result['pixel_accuracy']:.4f}, mIoU {result['miou']:.4f} "
                     + " ".join(f"{n} {result['iou'][n]:.3f}" for n in CLASS_NAMES)
                     + f" ({seconds:.0f} s, {row['images_per_second']} img/s)" + (" *best*" if improved else ""))
        return {"run_dir": str(self.run_dir), "epochs": config.epochs, "best_miou": self.best_miou, "last": result}

    def _train_epoch(self, train: SegmentationData, epoch: int, steps: int, total_steps: int) -> float:
        config = self.config
        rng = np.random.default_rng([config.seed, epoch])
        group = self.group
        part = None if group is None else (lambda n: shard(n, group.rank, group.size))   # this process's share
        batches = iterate_batches(train, config.batch_size, shuffle=True, rng=rng,
                                  augment=config.augmentation() or False, drop_last=True, shard=part)
        bar = tqdm(batches, total=steps, desc=f"epoch {epoch}/{config.epochs}", disable=not self.progress,
                   dynamic_ncols=True)
        self.model.train()
        running, seen, started = 0.0, 0, time.time()
        for i, (x, y, _) in enumerate(bar):
            step = (epoch - 1) * steps + i
            self.optimizer.lr = learning_rate(config, step, total_steps)
            x, y = to_device(x), to_device(y)
            self.optimizer.zero_grad()
            loss = self.loss_fn.forward(self.model.forward(x), y)
            self.model.backward(self.loss_fn.backward(), input_grad=False)  # no gradient for the images
            if group is not None:  # every process's share of the batch's gradient, added up
                group.allreduce(self.optimizer.grad)
            value = float(loss)  # the one host transfer of the step (the whole batch's loss)
            if not math.isfinite(value):
                last = self.run_dir / "last.npz"
                advice = (f"the last good checkpoint {last} (epoch {epoch - 1}) is untouched: lower --lr "
                          f"and run again with --resume" if last.is_file() else
                          "no checkpoint was written yet: lower --lr and run again with --force")
                raise TrainingError(f"loss became {value} at epoch {epoch}, step {i + 1}/{steps} (learning rate "
                                    f"{self.optimizer.lr:.3g}); {advice}")
            self.optimizer.step()
            running += value * config.batch_size
            seen += config.batch_size
            bar.set_postfix(loss=f"{running / seen:.4f}", img_s=f"{seen / (time.time() - started):.1f}",
                            refresh=False)
        bar.close()
        return running / max(seen, 1)

    def _share(self) -> str:
        """How many images of a batch each process takes: "4", or "2-3" for unequal shares."""
        low, high = self.config.batch_size // self.group.size, -(-self.config.batch_size // self.group.size)
        return f"{low}" if low == high else f"{low}-{high}"

    def _average_running_statistics(self) -> None:
        """Without synchronized BatchNorm each process's running statistics follow its own shards: the
        processes' average makes them one model again (for validation and the checkpoint)."""
        for module in self.model.modules():
            for name in module.buffer_names:
                value = self.group.allreduce(backend.xp.ascontiguousarray(getattr(module, name)))
                setattr(module, name, value / self.group.size)

    def _augmentation_figure(self, train: SegmentationData) -> None:
        """augmentations.png: a few training images as they are, then as the batches may show them.

        Drawn from a generator seeded with (seed, 0): epoch 0 is never trained, so the figure takes
        nothing from the training batches' random numbers and the run stays the same with or without it."""
        settings = self.config.augmentation()
        path = self.run_dir / "augmentations.png"
        if settings is None or path.is_file() or not self.writer:
            return
        from tinyunet.viz import save_augmentation_grid

        shown = train.subset(np.array(spread_subset(list(range(len(train))), AUGMENTATION_IMAGES)))
        rng = np.random.default_rng([self.config.seed, 0])
        draws = [augment(shown.images, shown.labels, rng, settings) for _ in range(AUGMENTATION_VARIANTS - 1)]
        save_augmentation_grid([(shown.images, shown.labels)] + draws, path)

    def _figures(self, rows: List[Dict[str, Any]], preview: SegmentationData, preview_x: np.ndarray) -> None:
        from tinyunet.viz import plot_curves, plot_predictions  # matplotlib only when figures are drawn

        plot_curves(rows, self.run_dir / "curves.png")
        pred = predict_labels(self.model, preview_x)
        plot_predictions(preview.images, preview.labels, pred, self.run_dir / "predictions.png",
                         names=preview.names)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a run folder its ``best.npz`` (else ``last.npz``)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in ("best.npz", "last.npz"):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path} is a folder without best.npz or last.npz: pass a run folder of "
                          "`tinyunet train` or a checkpoint file")


def load_model(checkpoint: str | os.PathLike) -> Tuple[Any, Dict[str, Any]]:
    """A model rebuilt from a checkpoint's configuration (a file, or a run folder: its best.npz),
    with its weights, in eval mode."""
    checkpoint = checkpoint_file(checkpoint)
    _, _, meta = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(meta.get("config", {}))
    model = create_model(**config.model_kwargs())
    restore(model, None, checkpoint)
    model.eval()
    return model, meta
