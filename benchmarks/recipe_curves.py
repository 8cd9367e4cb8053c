"""Validation mIoU against training minutes for the runs of the README's recipe table.

    python benchmarks/recipe_curves.py docs/recipe/*/ --out docs/figures/pets-recipe-curves.png
    python benchmarks/recipe_curves.py docs/recipe/*/ --out ... --images-per-second 46.4

Each run folder holds a metrics.csv of `tinyunet train`; the x axis is the running sum of its
"seconds" column (each epoch's training time; the few seconds of validation per epoch are left out),
so a run slowed by other work on the shared machine stretches to the right. With
``--images-per-second R`` it is instead the images trained on so far divided by R: the minutes on a
machine that trains R images per second (a rate measured on an idle machine), the same for every run
however busy its machine was.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (or copies of them) holding metrics.csv")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--images-per-second", type=float, default=None,
                        help="x = images trained on / this rate, instead of the runs' own training seconds")
    args = parser.parse_args()
    fig = Figure(figsize=(6.4, 3.6), dpi=90)
    ax = fig.add_subplot()
    for run in map(Path, args.runs):
        with open(run / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        minutes, total = [], 0.0
        for row in rows:
            # an epoch's images: its seconds times its images/s (metrics.csv has both)
            images = float(row["seconds"]) * float(row["images_per_second"])
            total += images / args.images_per_second if args.images_per_second else float(row["seconds"])
            minutes.append(total / 60)
        ax.plot(minutes, [float(r["val_miou"]) for r in rows], marker=".", label=run.name)
    ax.set_xlabel(f"training minutes at {args.images_per_second:g} images/s" if args.images_per_second
                  else "training minutes (2 shared CPU cores)")
    ax.set_ylabel("validation mIoU (128x128)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out)
    # re-encoded small for the repository: a 64-colour palette PNG (lines and text need no more)
    with Image.open(args.out) as im:
        small = im.convert("RGB").quantize(colors=64)
    small.save(args.out, optimize=True)


if __name__ == "__main__":
    main()
