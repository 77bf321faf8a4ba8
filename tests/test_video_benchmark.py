"""benchmarks/video_stream.py runs end to end on the CPU (a one-minute stream, tiny shape), so
a GPU lease never finds it broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_video_stream_vlm_part_measures_memlayer_and_dense(tmp_path: Path) -> None:
    out = tmp_path / "video.json"
    command = [sys.executable, str(BENCHMARKS / "video_stream.py"), "--part", "vlm"]
    command += ["--minutes", "1", "--every-minutes", "1", "--ram-budget", "1MiB"]
    done = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    memlayer, dense = record["rows"]
    assert memlayer["frames"] == dense["frames"] == 60
    assert memlayer["encode_frames_per_s"] > 0 and dense["encode_frames_per_s"] > 0
    assert memlayer["first_token_s"] > 0 and dense["first_token_s"] > 0
    last = memlayer["timeline"][-1]
    assert last["tiers_mb"]["ram"] <= 1.0 < last["tiers_mb"]["ram"] + last["tiers_mb"]["disk"]
    assert dense["timeline"][-1]["kv_cache_mb"] > 0
