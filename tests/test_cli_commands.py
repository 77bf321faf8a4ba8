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


def test_scope_flags_follow_the_api_rules(tmp_path: Path) -> None:
    """The reported hole: `--tenant-id ""` was dropped and the search saw every tenant."""
    base = ["--path", str(tmp_path / "m"), "--embedder", "hash"]
    assert (
        _cli("add", "acme secret plan", "--id", "n1", "--tenant-id", "acme", *base).returncode == 0
    )
    assert _cli("add", "globex plan", "--id", "n1", "--tenant-id", "globex", *base).returncode == 0
    empty = _cli("search", "secret plan", "--json", "--tenant-id", "", *base)
    assert empty.returncode == 2 and empty.stdout == ""
    assert empty.stderr.startswith("memlayer: error: tenant_id:")
    assert len(empty.stderr.strip().splitlines()) == 1

    globex = ["--tenant-id", "globex", *base]
    found = [
        json.loads(line)
        for line in _cli("search", "secret plan", "--json", *globex).stdout.splitlines()
    ]
    assert [row["text"] for row in found] == ["globex plan"]
    assert json.loads(_cli("get", "n1", *globex).stdout)["text"] == "globex plan"
    assert _cli("count", *globex).stdout.strip() == "1"
    assert _cli("delete", "n1", *globex).returncode == 0
    again = _cli("delete", "n1", *globex)
    assert again.returncode == 2 and "not found" in again.stderr
    acme = json.loads(_cli("get", "n1", "--tenant-id", "acme", *base).stdout)
    assert acme["text"] == "acme secret plan" and acme["tenant_id"] == "acme"
    assert _cli("get", "n1", *base).returncode == 2  # the default tenant has no n1


def test_bad_files_and_json_give_one_line_and_status_2(tmp_path: Path) -> None:
    base = ["--path", str(tmp_path / "m"), "--embedder", "hash"]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "image.bin"
    binary.write_bytes(b"GIF89a\xff\xfe\x00\x81" * 10)
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n  ")
    cases = [
        (("add", "x", "--metadata", "{not json"), "metadata: must be valid JSON"),
        (("add", "x", "--metadata", "[1, 2]"), "metadata: must be a dict"),
        (("search", "x", "--filters", "{'a': 1}"), "filters: must be valid JSON"),
        (("count", "--filters", '{"a": {"$regex": "x"}}'), "filters.a.$regex"),
        (("ingest", str(empty), "--no-progress"), "file: must not be empty"),
        (("ingest", str(blank), "--no-progress"), "file: holds no text to ingest"),
        (
            ("ingest", str(binary), "--no-progress"),
            "file: must be UTF-8 text (bad byte at offset 6)",
        ),
        (("ingest", str(tmp_path), "--no-progress"), "file: must be an existing file"),
        (
            ("ingest", str(tmp_path / "missing.txt"), "--no-progress"),
            "file: must be an existing file",
        ),
    ]
    for args, message in cases:
        result = _cli(*args, *base)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("memlayer: error: "), result.stderr
        assert message in result.stderr, (message, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _cli("count", *base).stdout.strip() == "0"
