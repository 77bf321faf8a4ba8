"""Every Python snippet of the README runs as written (each in a fresh folder and process)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
NEEDS_A_SERVER = "db.internal"  # names a production database: shown, not run
LOADS_SMOLLM2 = ("KVSession", "VideoSession")


def cases() -> list[object]:
    out: list[object] = []
    for number, code in enumerate(SNIPPETS):
        first = code.strip().splitlines()[0]
        marks = []
        if NEEDS_A_SERVER in code:
            marks.append(pytest.mark.skip(reason="connects to a production PostgreSQL"))
        if any(name in code for name in LOADS_SMOLLM2):
            marks.append(pytest.mark.slow)
        out.append(pytest.param(code, id=f"{number}-{first[:40]}", marks=marks))
    return out


@pytest.mark.parametrize("code", cases())
def test_readme_snippet_runs(code: str, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
