"""Train U-Net, ResUNet and Attention U-Net with the same recipe and budget on Oxford-IIIT Pet, then
compare them on the test split in one Markdown table.

    python benchmarks/compare_variants.py --data DATA --size 128 --epochs 10 --out runs/variants

Each architecture trains in its own run folder ``OUT/<arch>`` with :class:`tinyunet.train.Trainer`
(same seed, data, augmentation, optimizer and schedule: only ``arch`` differs), and its best
checkpoint (by validation mIoU) is evaluated on the test split with
:func:`tinyunet.evaluate.evaluate_checkpoint`. "s/epoch" is the mean training time of an epoch
(validation excluded), from the run's metrics.csv. The table is printed and written to
``OUT/results.md``.

A quick smoke run: ``--size 32 --epochs 1 --limit 64 --test-limit 32``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from tinyunet import backend
from tinyunet.classes import CLASS_NAMES
from tinyunet.errors import TinyUNetError
from tinyunet.evaluate import evaluate_checkpoint
from tinyunet.models import ARCHITECTURES
from tinyunet.train import TrainConfig, Trainer


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None,
                   help="Oxford-IIIT Pet folder (default: $TINYUNET_DATA, else the download folder)")
    p.add_argument("--out", required=True, help="folder for one run folder per architecture and results.md")
    p.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    p.add_argument("--size", type=int, default=d.size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--base-channels", type=int, default=d.base_channels)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit", type=int, default=None, help="use only N trainval images, evenly spaced over the split")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on only N test images, evenly spaced over the split")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs in OUT (finished ones are kept)")
    p.add_argument("--force", action="store_true", help="delete existing run folders in OUT and start again")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def mean_epoch_seconds(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv", newline="") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    return sum(seconds) / max(len(seconds), 1)


def run_one(arch: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Train ``arch`` in OUT/<arch> and evaluate its best checkpoint on the test split."""
    config = TrainConfig(dataset="pets", data=args.data, arch=arch, size=args.size, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, base_channels=args.base_channels,
                         depth=args.depth, seed=args.seed, limit=args.limit)
    run_dir = Path(args.out) / arch
    trainer = Trainer(config, run_dir, resume=args.resume, force=args.force, progress=not args.quiet,
                      log=lambda line: print(f"[{arch}] {line}", file=sys.stderr))
    trainer.fit()
    result = evaluate_checkpoint(run_dir / "best.npz", args.data, "test", progress=not args.quiet,
                                 limit=args.test_limit)
    return {"arch": arch, "parameters": trainer.model.num_parameters(), "seconds": mean_epoch_seconds(run_dir),
            "miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"], "iou": result["iou"],
            "num_images": result["num_images"]}


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    header = ["arch", "parameters", "s/epoch", "test mIoU", "pixel accuracy"] + [f"IoU {n}" for n in CLASS_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["arch"], f"{r['parameters']:,}", f"{r['seconds']:.1f}", f"{r['miou']:.4f}",
                 f"{r['pixel_accuracy']:.4f}"] + [f"{r['iou'][n]:.4f}" for n in CLASS_NAMES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.backend:
            backend.use(args.backend)
        rows = [run_one(arch, args) for arch in args.archs]
    except (TinyUNetError, backend.BackendError) as exc:
        print(f"compare_variants: error: {exc}", file=sys.stderr)
        return 2
    table = markdown_table(rows)
    recipe = (f"{args.epochs} epochs at {args.size}x{args.size}, batch {args.batch_size}, lr {args.lr}, "
              f"base {args.base_channels}, depth {args.depth}, seed {args.seed}, "
              f"{'all' if args.limit is None else args.limit} trainval images, "
              f"{rows[0]['num_images']} test images, backend {backend.name()}")
    text = f"{table}\n\n{recipe}\n"
    print(text, end="")
    (Path(args.out) / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
