"""The lessons' notebooks: in sync with the Markdown, and runnable in both states.

- Every committed lessons/*.ipynb is exactly what ``python lessons/make_notebooks.py`` makes from its
  .md (regenerated and compared here).
- Each notebook runs top to bottom in a Jupyter kernel (nbclient), from the lessons/ folder as
  Jupyter starts it, in FAST mode:
  * with the solutions (the Markdown's worked code in the exercise cells): every check prints PASS;
  * as committed, with the exercises as stubs: every check prints FAIL with a hint, and the notebook
    still runs on to its last cell (the reference stands in after each failure).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lessons"))

make_notebooks = pytest.importorskip("make_notebooks")   # needs jupytext ([test] installs it)
nbclient = pytest.importorskip("nbclient")

from test_lessons import pets_root  # noqa: E402

SOURCES = make_notebooks.SOURCES
CHECK_CALL = re.compile(r"^(\w+) = (check_\w+)\(\1[,)]", re.M)   # yours = check_yours(yours, ...)


def exercise_sources() -> List[Path]:
    return [p for p in SOURCES if CHECK_CALL.search(p.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.stem)
def test_notebook_in_sync(md: Path) -> None:
    target = make_notebooks.notebook_path(md)
    assert target.exists(), f"{target.name} is missing: run `python lessons/make_notebooks.py`"
    assert target.read_text(encoding="utf-8") == make_notebooks.render(md), \
        f"{target.name} differs from what {md.name} makes: run `python lessons/make_notebooks.py`"


def test_stub_functions_keeps_signature_and_docstring() -> None:
    code = ('import numpy as np\n\n# Exercise: write it\ndef f(x, y=1):\n    """Doc."""\n    z = x + y\n'
            '    return z\n\ndef g(x):\n    return x\n')
    stubbed = make_notebooks.stub_functions(code)
    assert 'def f(x, y=1):\n    """Doc."""\n    # your code here' in stubbed
    assert 'raise NotImplementedError("f: not written yet")' in stubbed
    assert "z = x + y" not in stubbed and "def g(x):\n    return x" in stubbed   # only the marked one
    namespace: dict = {}
    exec(stubbed, namespace)
    with pytest.raises(NotImplementedError):
        namespace["f"](1)
    with pytest.raises(ValueError):
        make_notebooks.stub_functions("# Exercise: nothing follows\nx = 1\n")


def run_notebook(nb, monkeypatch, tmp_path: Path) -> List[str]:
    """Execute ``nb`` in a fresh kernel started in lessons/; -> the text output of every code cell.

    The kernel is this very interpreter (a kernelspec written for the test, found first through
    JUPYTER_PATH), whatever other "python3" kernels the machine has."""
    spec = tmp_path / "kernels" / "tinyunet-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tinyunet tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("TINYUNET_LESSON_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    monkeypatch.delenv("TINYUNET_BACKEND", raising=False)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="tinyunet-test",
                                     resources={"metadata": {"path": str(REPO / "lessons")}})
    client.execute()
    outputs = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None, "a code cell did not run"
            outputs.append("".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream"))
    return outputs


def skip_without_pets(md: Path) -> None:
    if ("pets" in md.stem or "trimaps" in md.stem) and not pets_root().is_dir():
        pytest.skip(f"{md.name} needs the Oxford-IIIT Pet folder, not found at {pets_root()}")


@pytest.mark.slow
@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs_with_solutions(md: Path, monkeypatch, tmp_path: Path) -> None:
    skip_without_pets(md)
    outputs = run_notebook(make_notebooks.notebook(md, solutions=True), monkeypatch, tmp_path)
    text = "\n".join(outputs)
    checks = CHECK_CALL.findall(md.read_text(encoding="utf-8"))
    assert "FAIL" not in text, text[text.index("FAIL") - 200:text.index("FAIL") + 400]
    assert text.count(": PASS") == len(checks), f"expected {len(checks)} PASS lines:\n{text[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("md", exercise_sources(), ids=lambda p: p.stem)
def test_notebook_runs_with_stubs(md: Path, monkeypatch, tmp_path: Path) -> None:
    """The learner's notebook before any exercise is done: each check fails clearly, the rest runs."""
    skip_without_pets(md)
    import nbformat

    nb = nbformat.read(make_notebooks.notebook_path(md), as_version=4)
    outputs = run_notebook(nb, monkeypatch, tmp_path)
    checks = CHECK_CALL.findall(md.read_text(encoding="utf-8"))
    failures = [line for out in outputs for line in out.splitlines() if ": FAIL " in line]
    assert len(failures) == len(checks), f"expected {len(checks)} FAIL lines, got {failures}"
    assert all("not written yet" in line for line in failures), failures
    text = "\n".join(outputs)
    assert text.count("  hint: ") == len(checks) and ": PASS" not in text
    assert text.count("stands in for yours") == len(checks)


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.stem)
def test_answer_folds_are_folded_in_the_notebook(md: Path) -> None:
    """The code of a lesson's <details> answers is folded in its notebook (source_hidden), and no other
    cell is: the learner opens an answer on purpose."""
    import jupytext

    text = md.read_text(encoding="utf-8")
    answers = []   # the python blocks inside a fold, in order
    for fold in re.findall(r"^<details>.*?^</details>", text, flags=re.M | re.S):
        answers += [c.source for c in jupytext.reads(fold, fmt="md").cells if c.cell_type == "code"]
    nb = make_notebooks.notebook(md)
    hidden = [c.source for c in nb.cells if c.metadata.get("jupyter", {}).get("source_hidden")]
    assert hidden == answers
