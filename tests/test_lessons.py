"""The lessons are executable: every ```python block of lessons/NN-*.md runs, in order, in one namespace
per lesson (a fresh Python process each), with the repository root as the working directory, pasted
line by line into a Python prompt (``code.InteractiveConsole``), as a learner who types along does. A
lesson that stops working fails here, with the line of the .md file where the failing statement starts.

Long lessons read ``TINYUNET_LESSON_FAST=1`` (set below) and use fewer images and steps; the text shows
the real settings. Lesson 12 needs the real Oxford-IIIT Pet folder and is skipped only when it is
truly absent. Also checked: each lesson's first line after the title ("You will be able to: ..."),
its link to the next lesson, every relative link and image, the figures' size budget, and that
lessons/README.md lists every lesson.
"""
from __future__ import annotations

import code
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LESSONS_DIR = REPO / "lessons"
LESSONS = sorted(LESSONS_DIR.glob("[0-9][0-9]-*.md"))
FIGURES_DIR = LESSONS_DIR / "figures"

# a fenced block that starts with ```python on its own line; other languages (bash, text) are not run
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block, in order."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def pets_root() -> Path:
    env = os.environ.get("TINYUNET_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "oxford-iiit-pet"


def test_lessons_exist():
    numbers = [int(p.name[:2]) for p in LESSONS]
    assert numbers == list(range(1, len(LESSONS) + 1)), f"lessons must be numbered 01, 02, ... without gaps: {numbers}"
    assert len(LESSONS) >= 11


class PastedLesson(code.InteractiveConsole):
    """A plain Python prompt into which a learner pastes the lesson's blocks, one line at a time.

    Lesson 01 says "type along": every block must work when pasted into ``python`` (not only when run
    as a file). At the prompt a blank line ends an indented block, and a statement after an indented
    block needs a blank line before it; a block that breaks either rule fails here. Any error stops
    the lesson with the line of the .md file where the failing statement starts.
    """

    def __init__(self, path: str) -> None:
        super().__init__({"__name__": "__lesson__"}, filename=path)
        self.path, self.statement_line = path, 0

    def showsyntaxerror(self, filename=None, **kwargs) -> None:
        super().showsyntaxerror(filename, **kwargs)
        self.stop("does not paste into a Python prompt (a blank line inside an indented block, or no blank line after one?)")

    def showtraceback(self) -> None:
        super().showtraceback()
        self.stop("raised")

    def stop(self, what: str) -> None:
        sys.stderr.write(f"{self.path}:{self.statement_line}: the statement starting here {what}\n")
        raise SystemExit(1)

    def paste(self, first_line: int, block: str) -> None:
        waiting = False
        for offset, line in enumerate(block.splitlines() + [""]):   # the final Enter after a paste
            if not waiting:
                self.statement_line = first_line + offset
            waiting = self.push(line)


# Runs in a fresh interpreter, exactly like a learner pasting the blocks into an empty session.
_RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from test_lessons import PastedLesson, python_blocks
path = {path!r}
console = PastedLesson(path)
for line, block in python_blocks(open(path, encoding="utf-8").read()):
    console.paste(line, block)
"""


def run_lesson(path: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    code = _RUNNER.format(tests=str(REPO / "tests"), path=str(path))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_runs(path: Path, tmp_path: Path) -> None:
    if path.stem.endswith("oxford-iiit-pet-trimaps") and not pets_root().is_dir():
        pytest.skip(f"lesson 12 needs the Oxford-IIIT Pet folder, not found at {pets_root()}")
    env = dict(os.environ)
    env.update(
        TINYUNET_LESSON_FAST="1",
        MPLBACKEND="Agg",
        TINYUNET_CACHE=str(tmp_path / "cache"),  # no decoded-pets cache left in $HOME
        # One BLAS thread: a multi-threaded BLAS on a busy 2-core machine can run 10-100x slower
        # (its threads wait for each other); these are correctness runs, not benchmarks.
        OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
    )
    env.pop("TINYUNET_BACKEND", None)  # each lesson chooses its backend itself
    started = time.perf_counter()
    result = run_lesson(path, env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        pytest.fail(f"{path.name} failed after {seconds:.1f} s:\n{result.stderr[-4000:]}", pytrace=False)
    print(f"{path.name}: {seconds:.1f} s")


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_shape(path: Path) -> None:
    """Title, "You will be able to:" line, at least one code block, a link to the next lesson."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{path.name} must start with a '# ' title"
    assert lines[1].startswith("You will be able to:"), f"{path.name}: the line after the title must be 'You will be able to: ...'"
    assert python_blocks(path.read_text(encoding="utf-8")), f"{path.name} has no ```python block"
    following = [p for p in LESSONS if p.name > path.name]
    if following:
        assert f"({following[0].name})" in lines[-1], f"{path.name} must end with a link to {following[0].name}"


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces
    to hyphens ("## U-Net variants compared" -> "u-net-variants-compared"). Fenced code is skipped
    (a "# comment" there is no heading)."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_heading_anchors_follow_github() -> None:
    assert heading_anchors("# A title\n## U-Net variants compared, 2×\n```\n# not a heading\n```\n") == \
        {"a-title", "u-net-variants-compared-2"}


DOCS = LESSONS + [LESSONS_DIR / "README.md", REPO / "README.md", REPO / "benchmarks" / "README.md"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    """Every link to a file of the repository points to one that exists, and an #anchor to one of
    its headings."""
    for target in _LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # web links
        name, _, anchor = target.partition("#")
        file = (path.parent / name).resolve() if name else path
        assert file.exists(), f"{path.name} links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in heading_anchors(file.read_text(encoding="utf-8")), \
                f"{path.name} links to {target}: {file.name} has no such heading"


def test_readme_lists_every_lesson() -> None:
    readme = (LESSONS_DIR / "README.md").read_text(encoding="utf-8")
    for path in LESSONS:
        assert f"({path.name})" in readme, f"lessons/README.md does not link {path.name}"


def test_readme_counts_the_exercises() -> None:
    """The README's number of functions left to write is the number of ``# Exercise`` lines."""
    count = sum(len(re.findall(r"^# Exercise\b", p.read_text(encoding="utf-8"), flags=re.M)) for p in LESSONS)
    stated = re.search(r"in which (\d+)\s+functions are left for you to write", (REPO / "README.md").read_text(encoding="utf-8"))
    assert stated and int(stated.group(1)) == count, f"the README should say {count} functions"


def test_figures_are_small_and_used() -> None:
    figures = sorted(FIGURES_DIR.glob("*.png"))
    assert figures, "no figures: run `python lessons/make_figures.py`"
    sizes = {f.name: f.stat().st_size for f in figures}
    assert all(s < 150_000 for s in sizes.values()), f"figures over 150 KB: {[n for n, s in sizes.items() if s >= 150_000]}"
    assert sum(sizes.values()) < 2_000_000, f"figures total {sum(sizes.values())} bytes, over 2 MB"
    text = "".join(p.read_text(encoding="utf-8") for p in LESSONS)
    unused = [n for n in sizes if f"figures/{n}" not in text]
    assert not unused, f"figures no lesson shows: {unused}"


@pytest.mark.parametrize("block, fails", [
    ("def f(x):\n    y = x + 1\n\n    return y\n", True),          # a blank line inside a function
    ("for i in range(2):\n    pass\nprint('after')\n", True),      # no blank line after an indented block
    ("if True:\n    a = 1\nelse:\n    a = 2\n\nprint(a)\n", False),
    ("def f(x):\n    return x\n\nprint(f(1))\n", False),
    ("1 / 0\n", True),
])
def test_pasted_lesson_catches_what_a_prompt_rejects(block: str, fails: bool, tmp_path: Path) -> None:
    lesson = tmp_path / "01-x.md"
    lesson.write_text(f"# t\n\n```python\n{block}```\n", encoding="utf-8")
    code_ = f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n" \
            "from test_lessons import PastedLesson, python_blocks\n" \
            f"c = PastedLesson({str(lesson)!r})\n" \
            f"[c.paste(n, b) for n, b in python_blocks(open({str(lesson)!r}).read())]\n"
    result = subprocess.run([sys.executable, "-c", code_], capture_output=True, text=True, timeout=60)
    assert (result.returncode != 0) == fails, result.stderr
    if fails:
        assert f"{lesson}:4:" in result.stderr or f"{lesson}:" in result.stderr
