"""The Python code blocks of the README, the getting-started page and docs/generic.md run as written."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/getting_started.md", "docs/generic.md", "docs/existing_deq.md"]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_execute(page):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python code block"
    namespace = {"__name__": "__doc_snippet__"}  # a page's blocks run in order, like a reader's session
    for code in blocks:
        exec(compile(code, f"{page}:python-block", "exec"), namespace)
