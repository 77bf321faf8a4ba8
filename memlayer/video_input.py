"""Video frames in: decoded from a file with PyAV, or from a live iterator, at a target rate.

Both give (timestamp in seconds, frame) pairs lazily, one frame in memory at a time, so an
hour of video streams with bounded memory. A frame is an RGB uint8 array [H, W, 3] or a
text frame (a string: one line of an event log, a caption, a transcript span).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memlayer.errors import InvalidInputError, NotFoundError
from memlayer.optional import require

Frame = np.ndarray | str
_EPSILON = 1e-6  # timestamps are rationals turned into floats


def read_video(
    path: str | Path, *, fps: float | None = 1.0, size: int | tuple[int, int] | None = None
) -> Iterator[tuple[float, np.ndarray]]:
    """Frames of the video file at `path` sampled at `fps` (None: every frame), as (seconds,
    RGB uint8 [H, W, 3]).

    `size` resizes while decoding (an int: square; a pair: width, height), so full-size frames
    never pile up. Frames are decoded one at a time and the file is closed when the iterator
    ends or is dropped.
    """
    av = require("av", "video")
    file = Path(path)
    if not file.is_file():
        raise NotFoundError("video file", str(file))
    width, height = (size, size) if isinstance(size, int) else (size or (None, None))
    container = av.open(str(file))
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded = (
            (float(frame.time), frame)
            for frame in container.decode(stream)
            if frame.time is not None
        )
        for time, frame in sample(decoded, fps):
            options = {"width": width, "height": height} if width else {}
            yield time, frame.to_ndarray(format="rgb24", **options)
    finally:
        container.close()


def sample(source: Iterable[tuple[float, Any]], fps: float | None) -> Iterator[tuple[float, Any]]:
    """Keep one (timestamp, frame) pair per 1/fps seconds (every pair when fps is None): the
    first at or after each due time. Timestamps must increase (InvalidInputError names the
    first that does not)."""
    if fps is not None and (
        not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps < math.inf
    ):
        raise InvalidInputError("fps", "must be a positive number or None", fps)
    step = 1.0 / fps if fps is not None else 0.0
    due = -math.inf
    last = -math.inf
    for time, frame in source:
        if not isinstance(time, (int, float)) or not math.isfinite(time):
            raise InvalidInputError("timestamp", "must be a finite number of seconds", time)
        if time <= last:
            raise InvalidInputError("timestamp", f"must increase (after {last})", time)
        last = time
        if time + _EPSILON >= due:
            yield float(time), frame
            if step:
                due = (due if math.isfinite(due) else time) + step
                while due <= time + _EPSILON:  # a gap in the stream: the next due time after
                    due += step


def clock(seconds: float) -> str:
    """A timestamp as H:MM:SS (tenths added when not a whole second): how answers cite it."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}"
    tenths = round((seconds - whole) * 10)
    return f"{text}.{tenths}" if tenths and tenths < 10 else text
