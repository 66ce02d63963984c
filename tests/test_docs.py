"""The documentation stays true to the code.

- The MkDocs site builds with `mkdocs build --strict` (broken links and anchors are errors).
- Every page the nav names exists, every page in docs/ is in the nav (the generated results under
  docs/results/ aside), the README stays short and its links into docs/ resolve.
- Every ```python block in docs/*.md and README.md runs, each in a fresh interpreter from the
  repository root. A block that cannot run on its own is marked by `<!-- no-run: REASON -->` on
  the line just before its fence (docs/writing-docs.md describes the convention).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MKDOCS_YML = ROOT / "mkdocs.yml"
README_MAX_LINES = 320
GENERATED = DOCS / "results"  # written by the study tool, benchmarks and notebooks: not in the nav

PYTHON_LANGS = {"python", "py", "python3"}
NO_RUN = re.compile(r"^\s*<!--\s*no-run:(.*?)-->\s*$")
FENCE_OPEN = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^`\s{]*)")


def pages() -> list[Path]:
    """The hand-written pages (docs/*.md) and the README: where snippets live."""
    return sorted(DOCS.glob("*.md")) + [README]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    lang: str
    code: str
    no_run: str | None  # the reason, where the block is marked no-run

    @property
    def id(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Fenced code blocks in CommonMark's sense: a fence closes only with the same character, at
    least as long, so a ```python inside a ````markdown example is not a block of its own."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [ln[indent:] if ln[:indent].strip() == "" else ln.lstrip() for ln in lines[i + 1:j]]
        marker = NO_RUN.match(lines[i - 1]) if i > 0 else None
        blocks.append(Block(path, i + 1, j + 1, lang, "\n".join(body) + "\n",
                            marker.group(1).strip() if marker else None))
        i = j + 1
    return blocks


def fenced_lines(path: Path) -> set[int]:
    """1-based numbers of the lines in fenced blocks, fences included."""
    return {n for b in fenced_blocks(path) for n in range(b.line, b.end + 1)}


def python_blocks() -> list[Block]:
    return [b for p in pages() for b in fenced_blocks(p) if b.lang in PYTHON_LANGS]


RUNNABLE = [b for b in python_blocks() if b.no_run is None]


def test_snippets_are_found():
    # the collector itself: a regression here would make the snippet test pass vacuously
    ids = {b.id.split(":")[0] for b in RUNNABLE}
    assert {"README.md", "docs/api.md", "docs/depth-attention.md",
            "docs/adding-a-component.md"} <= ids
    nested = [b for b in fenced_blocks(DOCS / "writing-docs.md") if b.lang == "markdown"]
    assert nested and "```python" in nested[0].code  # an example, not a snippet


def test_no_run_markers_say_why_and_sit_on_a_python_block():
    for path in pages():
        lines = path.read_text(encoding="utf-8").splitlines()
        marked = {b.line - 1 for b in fenced_blocks(path) if b.lang in PYTHON_LANGS and b.no_run is not None}
        in_fences = fenced_lines(path)
        for n, line in enumerate(lines, start=1):
            prose = re.sub(r"`[^`]*`", "", line)  # a marker quoted in a code span is prose
            if re.search(r"<!--\s*no-run", prose) and n not in in_fences:
                where = f"{rel(path)}:{n}"
                m = NO_RUN.match(line)
                assert m and m.group(1).strip(), f"{where}: write `<!-- no-run: REASON -->`"
                assert n in marked, f"{where}: a no-run marker must be the line just before a ```python fence"


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_python_snippet_runs(block, tmp_path):
    script = tmp_path / (re.sub(r"\W", "_", block.id) + ".py")
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0:  # a doc bug: the page shows code that does not work
        pytest.fail(f"the snippet at {block.id} failed (exit {r.returncode}):\n{r.stderr[-3000:]}",
                    pytrace=False)


def _mkdocs_available() -> None:
    try:
        import material  # noqa: F401  (the theme, mkdocs-material)
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.skip("mkdocs-material is not installed: pip install -e '.[docs]' (the dev extra "
                    "has it too)")


def test_site_builds_strict(tmp_path):
    _mkdocs_available()
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # material's end-of-life banner
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                        str(MKDOCS_YML), "--site-dir", str(site)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}",
                    pytrace=False)
    assert (site / "index.html").is_file()
    assert (site / "loop-extrapolation" / "index.html").is_file()


def nav_pages() -> list[str]:
    yaml = pytest.importorskip("yaml")  # PyYAML: a dependency of omegaconf
    cfg = yaml.safe_load(MKDOCS_YML.read_text(encoding="utf-8"))
    assert cfg["docs_dir"] == "docs"

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    return [p for p in walk(cfg["nav"]) if not re.match(r"\w+://", p)]


def test_nav_pages_exist_and_every_page_is_in_the_nav():
    nav = nav_pages()
    assert len(nav) == len(set(nav)), "a page is in the nav twice"
    missing = [p for p in nav if not (DOCS / p).is_file()]
    assert not missing, f"in mkdocs.yml's nav but not in docs/: {missing}"
    pages_on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
                     if GENERATED not in p.parents}
    assert pages_on_disk - set(nav) == set(), "pages in docs/ that the nav does not reach"
    assert nav[0] == "index.md" and "loop-extrapolation.md" in nav


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (at most {README_MAX_LINES})"


def test_readme_quick_start_commands():
    text = README.read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [b for b in fenced_blocks(README) if b.lang == "bash" and b.code.split()[0] == "make"]
    assert [ln.split("#")[0].strip() for ln in commands[0].code.splitlines()] == ["make train", "make test"]
    assert "python train.py loop=8" in quick
    assert "HF_DATASETS_OFFLINE=1 .venv/bin/python -m pytest -q -n 2 --dist loadfile" in quick
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "$(PY) train.py loop=8" in makefile  # what the README says the two targets run
    assert "HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile" in makefile


def slug(heading: str) -> str:
    """Python-Markdown's default toc slug (and GitHub's, for these headings)."""
    text = re.sub(r"[`*]", "", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    found, in_fences = set(), fenced_lines(path)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        m = re.match(r"#{1,6} (.*?)\s*(\{#([\w-]+)\})?\s*$", line)
        if m and n not in in_fences:
            found.add(m.group(3) or slug(m.group(1)))
    return found


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if re.match(r"\w+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = README if not target else ROOT / target
        assert path.exists(), f"README links to {link}, which does not exist"
        if anchor:
            assert anchor in anchors(path), f"README links to {link}: no heading #{anchor} there"


REPO_PATH = re.compile(r"`((?:looped|tests|configs|notebooks|scripts|docs)/[\w./-]*\w)`")


def test_repo_paths_in_docs_exist():
    # Code spans that name a file or folder of the repository (`looped/model/depth.py`) must
    # name one that exists: files move, and the pages that point at them should move too.
    # Patterns (`configs/study/*.yaml`, `{360m,1.5b,3b}`, `<name>`) and fenced blocks are not checked.
    stale = []
    for path in pages():
        in_fences = fenced_lines(path)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if n in in_fences:
                continue
            for target in REPO_PATH.findall(line):
                if not (ROOT / target).exists():
                    stale.append(f"{rel(path)}:{n}: {target}")
    assert not stale, "paths that do not exist:\n" + "\n".join(stale)
