"""The `memlayer` command line, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memlayer.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_add_search_ingest_stats(tmp_path: Path) -> None:
    common = ["--path", str(tmp_path / "m"), "--embedder", "hash", "--user-id", "ada"]
    added = _cli("add", "Ada prefers the window seat", "--metadata", '{"kind": "pref"}', *common)
    assert added.returncode == 0, added.stderr
    record_id = added.stdout.strip()

    found = _cli("search", "window seat", "--json", "-k", "1", *common)
    assert found.returncode == 0, found.stderr
    row = json.loads(found.stdout.splitlines()[0])
    assert row["id"] == record_id and row["metadata"] == {"kind": "pref"}

    source = tmp_path / "notes.txt"
    source.write_text("The harbour opens at dawn. " * 300)
    ingested = _cli("ingest", str(source), "--no-progress", *common)
    assert ingested.returncode == 0, ingested.stderr
    assert "stored" in ingested.stdout

    stats = _cli("stats", *common)
    assert stats.returncode == 0
    records = int(
        next(ln for ln in stats.stdout.splitlines() if ln.startswith("records:")).split()[1]
    )
    assert records > 1

    other = _cli(
        "search",
        "window seat",
        "--json",
        "--path",
        str(tmp_path / "m"),
        "--embedder",
        "hash",
        "--user-id",
        "bob",
    )
    assert other.stdout.strip() == ""


def test_errors_are_reported_with_exit_status_2(tmp_path: Path) -> None:
    bad = _cli("search", "", "--path", str(tmp_path / "m"), "--embedder", "hash")
    assert bad.returncode == 2
    assert "query" in bad.stderr
    missing = _cli(
        "ingest", str(tmp_path / "nope.txt"), "--path", str(tmp_path / "m"), "--embedder", "hash"
    )
    assert missing.returncode == 2
    assert "nope.txt" in missing.stderr
