"""Make the lessons' notebooks from their Markdown: ``python lessons/make_notebooks.py`` (repository root).

    python lessons/make_notebooks.py            write lessons/NN-*.ipynb (and the GPU notebook) from the .md
    python lessons/make_notebooks.py --check    exit 1 if a committed notebook differs from what the .md makes

The Markdown lessons are the source: they hold the worked solutions, and the test suite runs them.
The notebooks are the learner's copy, converted by jupytext (Markdown cells and one code cell per
```python block), with four changes:

- a first cell that finds the repository, installs tinyunet when it is missing (Colab after cloning)
  and works from the repository root, as the lessons do;
- every function that follows a line ``# Exercise: ...`` in a code block becomes a stub: its
  signature and docstring stay, its body becomes ``raise NotImplementedError``. The check cell after
  it (``name = check_name(name)``, tinyunet/exercises.py) then reports the failure, with a hint, and
  lets the package's reference stand in, so the notebook runs on to the end;
- ```bash blocks stay text (commands to read or to type in a terminal, not to run in the notebook);
- ``<details>`` answer folds become a heading, and the code cells inside them are folded
  (``jupyter.source_hidden``: the learner clicks to open an answer; a fold cannot span several
  notebook cells), and links to other lessons point to their notebooks.

``notebook(path, solutions=True)`` gives the same notebook with the solutions in place: the tests run
both versions.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any, List

import jupytext
import nbformat

REPO = Path(__file__).resolve().parents[1]
LESSONS_DIR = REPO / "lessons"
# every numbered lesson, and the notebook that trains on a GPU
SOURCES = sorted(LESSONS_DIR.glob("[0-9][0-9]-*.md")) + sorted(LESSONS_DIR.glob("gpu-*.md"))

EXERCISE = re.compile(r"^# Exercise\b")

FIRST_CELL = '''\
# Run this cell first. It finds the tinyunet repository (this notebook's folder's parent, or
# ./tinyunet after `git clone` in Colab), installs the package if Python cannot import it yet,
# and makes the repository root the working directory, as the lessons expect.
import importlib.util, os, subprocess, sys
from pathlib import Path
for root in [Path.cwd(), *Path.cwd().parents, Path.cwd() / "tinyunet"]:
    if (root / "tinyunet" / "__init__.py").is_file() and (root / "setup.cfg").is_file():
        break
else:
    raise SystemExit("tinyunet's repository not found: clone it, then open this notebook from its lessons/ folder")
os.chdir(root)
if importlib.util.find_spec("tinyunet") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(root)], check=True)
if str(root) not in sys.path:
    sys.path.insert(0, str(root))
print("working in", root)'''


def stub_functions(code: str) -> str:
    """Replace the body of every function that follows an ``# Exercise`` line with a stub."""
    lines = code.split("\n")
    marked = [i for i, line in enumerate(lines) if EXERCISE.match(line)]
    if not marked:
        return code
    functions = {node.lineno - 1: node for node in ast.parse(code).body
                 if isinstance(node, ast.FunctionDef)}
    replacements = []
    for i in marked:
        first = min((n for n in functions if n > i), default=None)   # the next def (decorators: none here)
        if first is None or any(line.strip() and not line.startswith("#") for line in lines[i + 1:first]):
            raise ValueError(f"an '# Exercise' line must come right before a def:\n{lines[i]}")
        node = functions[first]
        body = node.body
        has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str)
        start = body[0].end_lineno if has_doc else body[0].lineno - 1   # keep the signature and docstring
        indent = " " * body[0].col_offset
        stub = [f"{indent}# your code here: the text above derives it, the check below tells you if it is right",
                f'{indent}raise NotImplementedError("{node.name}: not written yet")']
        replacements.append((start, node.end_lineno, stub))
    for i in marked:   # "in the notebook, this function's body is yours to write" -> "write this function's body"
        lines[i] = re.sub(r"in the notebook, (this function's body|these two functions' bodies) (is|are) yours to write",
                          r"write \1", lines[i])
    for start, stop, stub in sorted(replacements, reverse=True):
        lines[start:stop] = stub
    return "\n".join(lines)


def _markdown(text: str) -> Any:
    return nbformat.v4.new_markdown_cell(text)


def notebook(path: Path, solutions: bool = False) -> Any:
    """The notebook of one lesson: the learner's version (stubs), or with the solutions."""
    nb = jupytext.reads(path.read_text(encoding="utf-8"), fmt="md")
    cells: List[Any] = [nbformat.v4.new_code_cell(FIRST_CELL)]
    answers, folded = False, set()   # inside a <details> fold; the indices of its code cells
    for cell in nb.cells:
        source = cell.source
        if cell.cell_type == "code" and source.startswith("%%bash\n"):   # a ```bash block: keep it as text
            cell = _markdown("```bash\n" + source[len("%%bash\n"):] + "\n```")
            source = cell.source
        if cell.cell_type == "markdown":
            if "<details>" in source or "</details>" in source:
                answers = source.rfind("<details>") > source.rfind("</details>")
            source = re.sub(r"^<details><summary>(.*?)</summary>\s*$", r"**\1** (folded: click a cell to open it)",
                            source, flags=re.M)
            source = re.sub(r"^</details>\s*\n?", "", source, flags=re.M).strip("\n")
            source = re.sub(r"\]\((\d\d-[a-z0-9-]+)\.md\)", r"](\1.ipynb)", source)   # lesson links: to the notebooks
            if not source:
                continue
            if cells and cells[-1].cell_type == "markdown":   # one text cell between two code cells
                cells[-1].source += "\n\n" + source
            else:
                cells.append(_markdown(source))
        else:
            if answers:
                folded.add(len(cells))
            cells.append(nbformat.v4.new_code_cell(source if solutions else stub_functions(source)))
    for i, cell in enumerate(cells):
        cell.id = f"{path.stem[:2]}-{i:03d}"          # stable ids: regenerating changes nothing
        cell.metadata = {"jupyter": {"source_hidden": True}} if i in folded else {}
    out = nbformat.v4.new_notebook(cells=cells)
    out.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                    "language_info": {"name": "python"}}
    return out


def notebook_path(md: Path) -> Path:
    return md.with_suffix(".ipynb")


def render(md: Path) -> str:
    return nbformat.writes(notebook(md), version=4) + "\n"


def main(argv: List[str]) -> int:
    stale = []
    for md in SOURCES:
        text, target = render(md), notebook_path(md)
        if "--check" in argv:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(target.name)
        else:
            target.write_text(text, encoding="utf-8")
            print(f"{target.relative_to(REPO)}")
    if stale:
        print(f"out of date (run `python lessons/make_notebooks.py`): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
