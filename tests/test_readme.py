"""The README's Python examples run as written: each block, as its own script, in a
fresh directory (what it writes stays there), ends with exit 0."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def block_id(code: str) -> str:
    """The block's first import of the project's own models, or its first line."""
    found = re.search(r"from paramserver\.models\.\w+ import (\w+)", code)
    return found.group(1) if found else code.splitlines()[0][:30]


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 5, "the README's Python blocks were not found: has the fence changed?"


@pytest.mark.slow
@pytest.mark.parametrize("code", BLOCKS, ids=[block_id(b) for b in BLOCKS])
def test_a_readme_example_runs(tmp_path, code):
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
