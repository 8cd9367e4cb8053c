"""`tinyunet <command>`: argument parsing only; the work is done by the modules it calls.

Errors a user can cause (TinyUNetError and its kinds) are printed as one line, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
import warnings
from typing import Any, List, Optional

from tinyunet import __version__, backend
from tinyunet.errors import TinyUNetError


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="array backend (default: $TINYUNET_BACKEND, else cupy if a GPU is usable, else numpy)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of the CPU acceleration (default: $TINYUNET_NUM_THREADS, else every "
                        "usable core); results do not depend on it")
    p.add_argument("--no-accel", action="store_true",
                   help="run the reference layers alone (tinyunet/nn, the lessons' code; as TINYUNET_ACCEL=0): "
                        "the same maths, slower, nothing from tinyunet/accel")


_QUIET = "no progress bars (there are none either when the output is not a terminal, e.g. a log file)"


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal only: in a log file each update would be one more line."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _parser() -> argparse.ArgumentParser:
    from tinyunet.losses import LOSSES
    from tinyunet.models import ARCHITECTURES
    from tinyunet.train import PETS_RECIPE, SHAPES_RECIPE, TrainConfig

    d = TrainConfig()

    def recipe(name: str) -> str:
        """The default of a training option: the pets and the shapes recipe's, or the config's."""
        pets, shapes = (f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
                        for v in (PETS_RECIPE.get(name, getattr(d, name)), SHAPES_RECIPE.get(name, getattr(d, name))))
        return pets if pets == shapes else f"{pets} for pets, {shapes} for shapes"

    parser = argparse.ArgumentParser(prog="tinyunet", description="A from-scratch U-Net in NumPy/CuPy.")
    parser.add_argument("--version", action="version", version=f"tinyunet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = sub.add_parser("gradcheck", help="check every layer's backward against finite differences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true",
                   help="check every entry of the U-Net's tensors (about 30 s) instead of 50 random ones each")
    _add_backend(p)

    p = sub.add_parser("train", help="train a U-Net (on Oxford-IIIT Pet or synthetic shapes)")
    # Training options default to None: _train fills in TrainConfig's defaults, and --resume can tell
    # which options were given (and warn that the saved run ignores them).
    p.add_argument("--dataset", choices=["pets", "shapes"], default=None, help=f"default: {d.dataset}")
    p.add_argument("--data", default=None, help="Oxford-IIIT Pet folder (default: $TINYUNET_DATA, else the "
                                                "folder `tinyunet download` fills)")
    p.add_argument("--out", required=True, help="run folder for config, metrics, checkpoints and figures")
    p.add_argument("--arch", default=None, choices=list(ARCHITECTURES),
                   help="model architecture: unet, resunet (residual blocks) or attunet (attention gates on the "
                        f"skip connections) (default: {d.arch})")
    p.add_argument("--size", type=int, default=None, help=f"square training size (default: {recipe('size')})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default: {recipe('epochs')}; with --resume, a larger number extends the run")
    p.add_argument("--batch-size", type=int, default=None, help=f"default: {d.batch_size}")
    p.add_argument("--lr", type=float, default=None, help=f"Adam's learning rate (default: {d.lr:g})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"L2 penalty (default: {d.weight_decay:g})")
    p.add_argument("--schedule", choices=["cosine", "constant"], default=None,
                   help=f"learning rate: cosine decay to 0 over the run, per step, or constant (default: {d.schedule})")
    p.add_argument("--base-channels", type=int, default=None,
                   help=f"channels of the first level, doubled at each level down (default: {d.base_channels})")
    p.add_argument("--depth", type=int, default=None, help=f"number of down-sampling levels (default: {d.depth})")
    p.add_argument("--no-batchnorm", dest="batchnorm", action="store_false", default=None,
                   help="convolution blocks without BatchNorm2d")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no augmentation at all (none of the transforms below)")
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None,
                   help="no random left-right flips")
    p.add_argument("--scale", type=float, default=None, metavar="MIN_AREA",
                   help="random square crops keeping a share of the area in [MIN_AREA, 1], stretched to the full "
                        f"size; 1: none (default: {recipe('scale')})")
    p.add_argument("--rotate", type=float, default=None, metavar="DEGREES",
                   help=f"random rotations up to DEGREES either way; 0: none (default: {recipe('rotate')})")
    for name in ("brightness", "contrast", "saturation"):
        p.add_argument(f"--{name}", type=float, default=None, metavar="F",
                       help=f"random {name} factor in [1 - F, 1 + F]; 0: none (default: {recipe(name)})")
    p.add_argument("--loss", choices=list(LOSSES), default=None,
                   help=f"cross-entropy, soft Dice or their sum (default: {recipe('loss')})")
    p.add_argument("--no-sync-batchnorm", dest="sync_batchnorm", action="store_false", default=None,
                   help="on several processes (mpiexec), BatchNorm with each process's own images only instead "
                        "of all of the batch's (lesson 18)")
    p.add_argument("--seed", type=int, default=None, help=f"weights, shuffling and augmentation (default: {d.seed})")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"share of trainval held out for validation, pets only (default: {d.val_fraction:g}; "
                        "shapes draw their own num-shapes/8 validation images)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only N trainval images, evenly spaced over the split (quick runs; default: all)")
    p.add_argument("--num-shapes", type=int, default=None,
                   help=f"synthetic training images, shapes only (default: {d.num_shapes})")
    p.add_argument("--strict", action="store_true", default=None,
                   help="stop at the first bad image instead of skipping it")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its saved configuration "
                        "(only a larger --epochs and a moved --data change it)")
    p.add_argument("--force", action="store_true", help="delete an existing run folder and start again")
    p.add_argument("--quiet", action="store_true", help=_QUIET)
    _add_backend(p)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a split")
    p.add_argument("--checkpoint", required=True, help="a .npz checkpoint, or a run folder (its best.npz)")
    p.add_argument("--data", default=None,
                   help="Oxford-IIIT Pet folder (default: the folder the checkpoint was trained on)")
    p.add_argument("--split", choices=["test", "trainval"], default=None,
                   help="Oxford-IIIT Pet split (default test); shapes checkpoints use their own held-out images")
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only N images, evenly spaced over the split (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--mirror", action="store_true",
                   help="score the mean of the predictions for each image and its mirror image (test-time "
                        "augmentation: two forward passes per image)")
    p.add_argument("--quiet", action="store_true", help=_QUIET)
    _add_backend(p)

    p = sub.add_parser("predict", help="write mask and overlay PNGs for images")
    p.add_argument("--checkpoint", required=True, help="a .npz checkpoint, or a run folder (its best.npz)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders of them")
    p.add_argument("--out", required=True, help="folder for <name>_mask.png and <name>_overlay.png")
    p.add_argument("--mirror", action="store_true",
                   help="each mask from the mean of the predictions for the photo and its mirror image "
                        "(test-time augmentation: two forward passes per photo)")
    p.add_argument("--attention", action="store_true",
                   help="also write <name>_attention.png, the attention gates' coefficients over the photo "
                        "(attunet checkpoints)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--quiet", action="store_true", help=_QUIET)
    _add_backend(p)

    p = sub.add_parser("summary", help="per-layer table: output shape, parameters, memory kept for backward, FLOPs")
    p.add_argument("--arch", default=d.arch, choices=list(ARCHITECTURES), help="default: %(default)s")
    p.add_argument("--size", type=int, default=d.size, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--base-channels", type=int, default=d.base_channels, help="default: %(default)s")
    p.add_argument("--depth", type=int, default=d.depth, help="default: %(default)s")
    p.add_argument("--no-batchnorm", dest="batchnorm", action="store_false")
    _add_backend(p)

    p = sub.add_parser("download", help="download and verify Oxford-IIIT Pet (official archives, md5-checked)")
    p.add_argument("--root", default=None, help="target folder (default: $TINYUNET_DATA or ~/.cache/tinyunet/oxford-iiit-pet)")
    p.add_argument("--mirror", default=None, help="base URL to fetch images.tar.gz and annotations.tar.gz from")
    return parser


def _train(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from tinyunet.train import PETS_RECIPE, SHAPES_RECIPE, TrainConfig, Trainer

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if "data" in given:  # absolute: the run's config must still find it when --resume or evaluate runs
        given["data"] = os.path.abspath(given["data"])  # from another directory
    shapes = given.get("dataset", TrainConfig.dataset) == "shapes"
    config = TrainConfig(**{**(SHAPES_RECIPE if shapes else PETS_RECIPE), **given})
    group = args.group
    summary = Trainer(config, args.out, resume=args.resume, force=args.force, progress=_progress(args),
                      explicit=given, group=group).fit()
    if group is None or group.rank == 0:
        processes = f" ({group.size} processes)" if group is not None else ""
        print(f"done{processes}: best validation mIoU {summary['best_miou']:.4f}; checkpoints in {summary['run_dir']}")


def _json_safe(value):
    """NaN/inf floats -> None (JSON has no NaN), recursively through dicts and lists."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _evaluate(args: argparse.Namespace) -> None:
    from tinyunet.evaluate import evaluate_checkpoint, format_report

    if args.limit is not None and args.limit < 1:
        raise TinyUNetError(f"--limit must be at least 1, got {args.limit}")
    group = args.group
    result = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size,
                                 progress=_progress(args) and not args.json and (group is None or group.rank == 0),
                                 limit=args.limit, group=group, mirror=args.mirror)
    if group is not None and group.rank != 0:
        return
    if args.json:
        keys = ("checkpoint", "data", "split", "pixel_accuracy", "miou", "mdice", "iou", "dice", "confusion", "loss",
                "num_images", "size", "native", "mirror")
        # a class absent from truth and prediction has NaN IoU/Dice: null keeps the output valid JSON
        print(json.dumps(_json_safe({k: result[k] for k in keys if k in result}), allow_nan=False))
    else:
        print(format_report(result))


def _predict(args: argparse.Namespace) -> None:
    from tinyunet.predict import predict_files

    written = predict_files(args.checkpoint, args.inputs, args.out, progress=_progress(args), attention=args.attention,
                            strict=args.strict, mirror=args.mirror)
    print(f"wrote {len(written)} files to {args.out}")


def _download(args: argparse.Namespace) -> None:
    from tinyunet.data import default_data_dir, download, download_pets

    # the archive table is read when the command runs (not bound as a default argument), so tests can
    # serve their own tiny archives by replacing download.OFFICIAL_FILES
    root = download_pets(args.root or default_data_dir(), mirror=args.mirror, files=download.OFFICIAL_FILES,
                         progress=_progress(args))
    print(f"Oxford-IIIT Pet is ready in {root}")


def _summary(args: argparse.Namespace) -> None:
    from tinyunet.models import create_model
    from tinyunet.summary import format_summary, summarize
    from tinyunet.train import TrainConfig

    # the same checks as train's (sizes >= 1, the size divisible by 2**depth): one line, no traceback
    TrainConfig(arch=args.arch, size=args.size, batch_size=args.batch_size, base_channels=args.base_channels,
                depth=args.depth, batchnorm=args.batchnorm).validate()
    try:  # what only the network itself can tell
        model = create_model(args.arch, in_channels=3, num_classes=3, base_channels=args.base_channels,
                             depth=args.depth, batchnorm=args.batchnorm)
        shape = (args.batch_size, 3, args.size, args.size)
        table = format_summary(summarize(model, shape))
    except ValueError as exc:
        raise TinyUNetError(str(exc)) from exc
    print(f"{args.arch}: input {shape}, float32")
    print(table)


def _gradcheck(args: argparse.Namespace) -> int:
    from tinyunet.gradcheck import run_all

    rows = run_all(seed=args.seed, full=args.full)
    width = max(len(r[0]) for r in rows) + 2
    twidth = max(len(r[1]) for r in rows) + 2
    print(f"{'module':<{width}}{'tensor':<{twidth}}{'max rel. error':>15}  result")
    for module, tensor, err, ok in rows:
        print(f"{module:<{width}}{tensor:<{twidth}}{err:>15.2e}  {'pass' if ok else 'FAIL'}")
    failed = sum(not r[3] for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


COMMANDS = {"train": _train, "evaluate": _evaluate, "predict": _predict, "download": _download,
            "gradcheck": _gradcheck, "summary": _summary}


def _processes(args: argparse.Namespace) -> Any:
    """The process group when mpiexec started several processes (train and evaluate), else None. Each process
    of a machine gets its share of the cores, and on a GPU its own device."""
    from tinyunet import distributed

    if distributed.launched_size() <= 1:
        return None
    if args.command not in ("train", "evaluate"):
        raise TinyUNetError(f"`tinyunet {args.command}` runs as one process: start it without mpiexec")
    group = distributed.world()
    if backend.name() == "cupy":
        distributed.use_local_gpu(group)
    elif args.threads is None and not os.environ.get("TINYUNET_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.threads = max(1, cores // group.local_size())
        if not backend.accelerate():   # the reference's products: BLAS's own threads, as many
            from threadpoolctl import threadpool_limits
            threadpool_limits(limits=args.threads, user_api="blas")
    return group


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    formatwarning = warnings.formatwarning  # catch_warnings() does not restore it: we do
    accelerate = backend.accelerate_switch()   # restored below: main also runs inside the tests
    args.group = None
    try:
        if getattr(args, "backend", None):
            backend.use(args.backend)
        if getattr(args, "no_accel", False):
            backend.set_acceleration(False)
        args.group = _processes(args)
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise TinyUNetError(f"--threads must be at least 1, got {args.threads}")
            if backend.accelerate():
                from tinyunet.accel.parallel import set_num_threads
                set_num_threads(args.threads)
        # not predict: one big photo at a time, not steps; keeping its freed memory would only raise the peak
        if args.command in ("train", "evaluate") and backend.accelerate():
            from tinyunet.accel.allocator import keep_freed_host_memory
            keep_freed_host_memory()  # reuse freed arrays between steps (see there)
        with warnings.catch_warnings():
            # a data warning (skipped images) is one line for a user, not a source location
            warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
            return COMMANDS[args.command](args) or 0
    except (TinyUNetError, backend.BackendError, OSError) as exc:
        # OSError: a path the user gave is unwritable, full, ...: one line, not a traceback
        print(f"tinyunet {args.command}: error: {exc}", file=sys.stderr)
        return _end(args, 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _end(args, 130)
    except BaseException:
        if args.group is None:
            raise
        traceback.print_exc()
        return _end(args, 1)
    finally:
        warnings.formatwarning = formatwarning
        backend.set_acceleration(accelerate)


def _end(args: argparse.Namespace, code: int) -> int:
    """The exit code; with several processes, first the end of all of them: the others would wait for
    this one in their next allreduce forever."""
    if args.group is not None:
        args.group.abort(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
