"""benchmarks/video_stream.py runs end to end on the CPU (a one-minute stream, tiny shape), so
a GPU lease never finds it broken."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_video_stream_vlm_part_measures_memlayer_and_dense(tmp_path: Path, family: str) -> None:
    out = tmp_path / "video.json"
    command = [sys.executable, str(BENCHMARKS / "video_stream.py"), "--part", "vlm"]
    command += ["--family", family]
    command += ["--minutes", "1", "--every-minutes", "1", "--ram-budget", "1MiB"]
    done = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["family"] == family
    memlayer, dense = record["rows"]
    assert memlayer["frames"] == dense["frames"] == 60
    assert memlayer["encode_frames_per_s"] > 0 and dense["encode_frames_per_s"] > 0
    assert memlayer["first_token_s"] > 0 and dense["first_token_s"] > 0
    last = memlayer["timeline"][-1]
    assert last["tiers_mb"]["ram"] <= 1.0 < last["tiers_mb"]["ram"] + last["tiers_mb"]["disk"]
    assert dense["timeline"][-1]["kv_cache_mb"] > 0


# -- the text-frame questions (no model: the log, the questions and the answer checker) ------


def _text_benchmark() -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("video_stream")


def test_planted_events_are_distinct_and_carry_their_key_and_code() -> None:
    bench = _text_benchmark()
    log, events = bench.event_log(2000, 40, seed=0)
    assert len(events) == len(importlib.import_module("event_log").EVENTS) == 40
    assert len({e.key for e in events}) == len({e.code for e in events}) == 40
    for event in events:
        assert event.key in event.text and log[event.frame] == (event.timestamp, event.text)
        assert event.frame < 1800  # never in the last 10%
        others = [e.text for e in events if e is not event]
        assert not any(event.key in text for text in others)  # the key names one event


def test_the_question_gives_the_time_and_the_event_frame_holds_the_answer() -> None:
    """In the issue's forms ("code", "what") the cue names the event's time and is written
    exactly as in the event's frame, which holds the expected answer; the "when" forms never
    name the time."""
    bench = _text_benchmark()
    log, events = bench.event_log(300, 5, seed=3)
    for name in ("code", "what"):
        fmt = bench.FORMATS[name]
        written = bench.planted(name, log, events)
        for event in events:
            question = bench.cue(name, event)
            assert bench.clock(event.timestamp) in question
            line = fmt.line.format(time=bench.clock(event.timestamp), text=written[event.frame][1])
            _, found, after = line.partition(question)
            assert found and (event.code if name == "code" else event.key) in after
        routine = [i for i in range(300) if i not in {e.frame for e in events}]
        assert all(written[i] == log[i] for i in routine)
    assert bench.cue("code", events[0]) == f"The code at {bench.clock(events[0].timestamp)} is"
    for name in ("paren", "at", "line"):
        assert bench.planted(name, log, events) == log
        assert all(bench.clock(e.timestamp) not in bench.cue(name, e) for e in events)


def test_answers_are_checked_for_the_code_the_key_words_or_the_time() -> None:
    bench = _text_benchmark()
    _, events = bench.event_log(300, 5, seed=3)
    first, second = events[0], events[1]
    assert bench.answered("code", first, f" {first.code}.\n\nThe code")
    assert not bench.answered("code", first, f"{second.code}.")
    assert not bench.answered("code", first, first.code[:-1])
    assert bench.answered("what", first, f"camera 2: {first.key.upper()} was seen")
    assert not bench.answered("what", first, f"camera 2: {second.key}")
    at = bench.clock(first.timestamp)
    assert bench.answered("paren", first, f"{at}).") and not bench.answered("paren", first, "0:")
