"""Validation mIoU against training minutes for the runs of the README's recipe table.

    python benchmarks/recipe_curves.py docs/recipe/*/ --out docs/figures/pets-recipe-curves.png

Each run folder holds a metrics.csv of `tinyunet train`; the x axis is the running sum of its
"seconds" column (each epoch's training time; the few seconds of validation per epoch are left out),
so a run slowed by other work on the shared machine stretches to the right.
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
    args = parser.parse_args()
    fig = Figure(figsize=(6.4, 3.6), dpi=90)
    ax = fig.add_subplot()
    for run in map(Path, args.runs):
        with open(run / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        minutes, total = [], 0.0
        for row in rows:
            total += float(row["seconds"])
            minutes.append(total / 60)
        ax.plot(minutes, [float(r["val_miou"]) for r in rows], marker=".", label=run.name)
    ax.set_xlabel("training minutes (2 shared CPU cores)")
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
