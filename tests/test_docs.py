"""The documentation builds without a warning, and every Python code block of it runs as written.

Code blocks: each ```python block of README.md and each ``.. code-block:: python`` block of
docs/**/*.rst. The blocks of one file run in order in one namespace (a later block may use what an
earlier one defined), in a fresh interpreter started in a temporary directory. A block whose first
line is ``# docs: skip`` is not run (for one that needs data the tests do not have).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP_MARK = "# docs: skip"
RST_PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)

# the network is closed to everything the tests start here: a build that tries to fetch (an
# intersphinx inventory, say) fails instead of passing only where the network is open
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
OFFLINE.update({key.lower(): value for key, value in OFFLINE.items()})


def _markdown_blocks(text: str) -> list[tuple[int, str]]:
    """```python (or ```py) fences, at any indentation, with the line each code starts on."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*(python3?|py)\s*(\{.*\})?\s*$", lines[i])
        i += 1
        if not fence:
            continue
        indent, marker, start, body = fence.group(1), fence.group(2), i, []
        while i < len(lines) and not re.match(rf"^\s*{re.escape(marker[0])}{{{len(marker)},}}\s*$", lines[i]):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        blocks.append((start + 1, "\n".join(body)))
    return blocks


def _rst_blocks(text: str) -> list[tuple[int, str]]:
    """``.. code-block:: python`` (or ``code``/``sourcecode``) directives, options skipped."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        directive = re.match(r"^(\s*)\.\. (code-block|code|sourcecode)::\s*(python3?|py)\s*$", lines[i])
        i += 1
        if not directive:
            continue
        indent = len(directive.group(1))
        while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):  # :caption:, :linenos:, ...
            i += 1
        start, body = i, []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        blocks.append((start + 1, textwrap.dedent("\n".join(body)).strip("\n")))
    return blocks


def code_blocks(text: str, suffix: str) -> list[tuple[int, str]]:
    """``(line, source)`` of each Python block of a Markdown (``.md``) or reST text that is not
    empty or marked to skip."""
    blocks = _markdown_blocks(text) if suffix == ".md" else _rst_blocks(text)
    return [(line, code) for line, code in blocks if code.strip() and code.lstrip().splitlines()[0].strip() != SKIP_MARK]


# runs in the child: each block compiled under its document's name and line, so a traceback
# points into the document
_RUNNER = """
import json, sys
name, blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for line, code in blocks:
    print(f"--- {name}, block at line {line}", flush=True)
    exec(compile("\\n" * (line - 1) + code, name, "exec"), namespace)
"""


def test_block_extraction():
    markdown = "text\n```python\na = 1\n```\n```bash\nls\n```\n  ```py\n  b = a\n  ```\n```python\n# docs: skip\nc\n```\n"
    assert code_blocks(markdown, ".md") == [(3, "a = 1"), (9, "b = a")]
    rst = ("Title\n\n.. code-block:: python\n   :caption: x\n\n   a = 1\n\n   b = a\n\nafter\n\n"
           "::\n\n    not python\n\n.. code-block:: bash\n\n   ls\n\n.. code-block:: python\n\n   # docs: skip\n   c\n")
    assert code_blocks(rst, ".rst") == [(5, "a = 1\n\nb = a")]


# the README, and each page of the docs that has Python code blocks
DOCUMENTS = [ROOT / "README.md", *(p for p in RST_PAGES if code_blocks(p.read_text(encoding="utf-8"), p.suffix))]


@pytest.mark.docs
@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_code_blocks_run(path, tmp_path):
    blocks = code_blocks(path.read_text(encoding="utf-8"), path.suffix)
    if not blocks:
        pytest.skip(f"no Python code blocks to run in {path.name}")
    name = str(path.relative_to(ROOT))
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **OFFLINE, "PYTHONPATH": python_path, "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps([name, blocks]), capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=600)
    if run.returncode:
        pytest.fail(f"a code block of {name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}", pytrace=False)


@pytest.mark.docs
def test_docs_build_without_warnings(tmp_path):
    try:
        import myst_nb  # noqa: F401
        import sphinx  # noqa: F401
    except ImportError as missing:
        pytest.fail(f"{missing}: install the docs extra (bash scripts/install.sh test, or pip install -e '.[docs]')")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
               "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **OFFLINE},
                         timeout=900)
    if run.returncode:
        pytest.fail(f"sphinx-build -W failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}", pytrace=False)
    assert (tmp_path / "html" / "index.html").exists()
