"""The package's floors (DESIGN.md): the CLI on top, the workflows under it, then models, optimizers and
checkpoints, then the layers, losses, metrics, data and plots, and the ground (backend, classes, errors,
cache). An import may point down or along its floor, never up; and the reference layers know nothing of
data, files or plots. Read from the source with ``ast`` (imports inside functions count too)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tinyunet"

FLOORS = {
    "cli": 4,
    "train": 3, "evaluate": 3, "predict": 3, "gradcheck": 3, "exercises": 3,
    "models": 2, "optim": 2, "checkpoint": 2, "summary": 2, "memory": 2,
    "nn": 1, "accel": 1, "losses": 1, "metrics": 1, "data": 1, "viz": 1, "distributed": 1, "run_lock": 1,
    "backend": 0, "classes": 0, "errors": 0, "cache": 0, "fake_cupy": 0,
}
# sideways imports that the floors allow but the design does not
NEVER = {"nn": {"data", "viz", "checkpoint", "distributed", "metrics", "losses", "cache"},
         "accel": {"data", "viz", "checkpoint", "distributed", "metrics", "losses"},
         "data": {"nn", "accel"}}


def part(module: str) -> str:
    """tinyunet.nn.conv -> nn; tinyunet.train -> train; tinyunet -> '' (the package's __init__)."""
    names = module.split(".")
    return names[1] if len(names) > 1 else ""


def imports(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tinyunet":  # from tinyunet import backend, __version__
                found |= {f"tinyunet.{a.name}" for a in node.names}
            elif node.module.startswith("tinyunet."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tinyunet.")}
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_part_of_the_package_has_a_floor():
    parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in SOURCES} - {"__init__", "__main__"}
    assert parts == set(FLOORS), parts ^ set(FLOORS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_or_along(path):
    here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if here in ("__init__", "__main__"):
        return
    for module in imports(path):
        there = part(module)
        if there not in FLOORS or there == here:  # __version__ and the like; within one part
            continue
        assert FLOORS[there] <= FLOORS[here], f"{here} (floor {FLOORS[here]}) imports {module} (floor {FLOORS[there]})"
        assert there not in NEVER.get(here, ()), f"{here} imports {module}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The reader itself: a planted upward import (the layers asking the training loop) is found."""
    planted = tmp_path / "conv.py"
    planted.write_text("def f():\n    from tinyunet.train import Trainer\n    from tinyunet import viz\n")
    assert imports(planted) == {"tinyunet.train", "tinyunet.viz"}
