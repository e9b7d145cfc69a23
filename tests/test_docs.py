"""The documents under docs/: every ```python block of docs/chunk_math.md runs and its assertions hold (each
checks a chunk formula against the token-by-token recurrence in float64), the section headings that code
comments cite are there, and the relative links of the README and docs/ point at files that exist."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHUNK_MATH = ROOT / "docs" / "chunk_math.md"


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every ```python block of a Markdown file."""
    blocks, code, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if code is None and line.strip() == "```python":
            code, start = [], number
        elif code is not None and line.strip() == "```":
            blocks.append((start, "\n".join(code) + "\n"))
            code = None
        elif code is not None:
            code.append(line)
    assert code is None, f"{path.name}: the ```python block at line {start} is not closed"
    return blocks


BLOCKS = python_blocks(CHUNK_MATH)


def test_chunk_math_has_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("start,code", BLOCKS, ids=[f"line{start}" for start, _ in BLOCKS])
def test_chunk_math_block_runs(start, code):
    exec(compile(code, f"{CHUNK_MATH}:{start}", "exec"), {"__name__": f"chunk_math_line{start}"})


def test_chunk_math_sections():
    """Code comments cite 'docs/chunk_math.md section N' for the three forms."""
    headings = [line for line in CHUNK_MATH.read_text().splitlines() if line.startswith("## ")]
    for prefix in ("## 1. Additive", "## 2. Delta rule", "## 3. General", "## Numerics", "## Backward"):
        assert any(h.startswith(prefix) for h in headings), prefix


@pytest.mark.parametrize("doc", ["README.md", "BENCHMARKS.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))] + ["benchmarks/results/README.md",
                                                                       "benchmarks/experiments/README.md"])
def test_relative_links_resolve(doc):
    path = ROOT / doc
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{doc}: link to {target}, no such file"
