"""The README's variants table from the run folders: per architecture, test mIoU over the seeds.

    python benchmarks/recipe_table.py docs/recipe/unet-45ep-s* docs/recipe/resunet-45ep-s* docs/recipe/attunet-45ep-s*

Each folder holds the run's config.json and test.txt (the output of `tinyunet evaluate --split test`),
and test-mirror.txt where `evaluate --mirror` was run. Runs are grouped by their config's arch, epochs and
loss (so a group differs only in its seeds); each group prints one Markdown row: parameters (counted on a fresh model), the seeds, test mIoU at the
training size as mean (range), at each photo's own size, outline IoU, and the same with --mirror.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List


def scores(report: str) -> Dict[str, float]:
    """mIoU and outline IoU at the training size and at the photos' own size, from an evaluate report."""
    training, _, native = report.partition("at each photo's own size")
    result = {}
    for name, part in (("", training), ("native ", native)):
        miou = re.search(r"^mean IoU:\s+([0-9.]+)", part, re.M)
        outline = re.search(r"^outline\s+([0-9.]+)", part, re.M)
        if miou:
            result[name + "miou"] = float(miou.group(1))
        if outline:
            result[name + "outline"] = float(outline.group(1))
    return result


def spread(values: List[float]) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    return f"{mean:.4f} ({min(values):.4f}–{max(values):.4f})" if len(values) > 1 else f"{mean:.4f} (one seed)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with config.json and test.txt")
    args = parser.parse_args()
    groups: Dict[str, List[Path]] = defaultdict(list)   # runs that differ only in their seed
    for run in args.runs:
        config = json.loads((run / "config.json").read_text())
        groups[f"{config['arch']}, {config['epochs']} epochs, {config['loss']}"].append(run)
    from tinyunet.models import create_model

    print("| arch | parameters | seeds | test mIoU 128²: mean (range) | own size | outline IoU | with --mirror | outline, --mirror |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, runs in groups.items():
        config = json.loads((runs[0] / "config.json").read_text())
        model = create_model(config["arch"], base_channels=config["base_channels"], depth=config["depth"])
        parameters = sum(p.data.size for p in model.parameters())
        plain = [scores((r / "test.txt").read_text()) for r in runs if (r / "test.txt").is_file()]
        mirror = [scores((r / "test-mirror.txt").read_text()) for r in runs if (r / "test-mirror.txt").is_file()]
        seeds = ", ".join(str(json.loads((r / "config.json").read_text())["seed"]) for r in runs)
        column = lambda reports, key: spread([s[key] for s in reports if key in s])  # noqa: E731
        print(f"| {label} | {parameters:,} | {seeds} | {column(plain, 'miou')} | {column(plain, 'native miou')} | "
              f"{column(plain, 'outline')} | {column(mirror, 'miou')} | {column(mirror, 'outline')} |")


if __name__ == "__main__":
    main()
