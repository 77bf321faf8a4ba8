"""The README's `memlayer serve` curl example runs as written (on a free port, in a fresh
folder, with the model-free embedder) and answers from what it stored."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from server_process import free_port

README = Path(__file__).parent.parent / "README.md"


def test_readme_curl_example_runs(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    section = README.read_text().split("## The memory service", 1)[1]
    script = re.search(r"```bash\n(.*?)```", section, re.S)
    assert script is not None
    port = str(free_port())
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MEMLAYER_EMBEDDER": "hash",
    }
    run = subprocess.run(
        ["bash", "-e", "-c", script.group(1).replace("8000", port)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = re.sub(r"(INFO|WARNING):[^\n]*\n?", "", run.stdout)  # the server's log lines
    answers, decoder = [], json.JSONDecoder()
    while text := text.strip():  # curl prints each answer without a newline
        answer, end = decoder.raw_decode(text)
        answers.append(answer)
        text = text[end:]
    tenant, _messages, search, context = answers
    assert tenant["tenant_id"] == "acme"
    assert any("window seats" in hit["text"] for hit in search["hits"])
    assert "window seats" in context["text"] and context["ids"]
