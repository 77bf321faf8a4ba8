"""Run a writer script in a child process and SIGKILL it once it has acknowledged enough."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def kill_after_acks(script: str, *args: str, at_least: int, timeout_s: float = 60) -> int:
    """Start `script` (which prints each acknowledged index on its own line), SIGKILL it once
    index `at_least` is printed, and return the last index it acknowledged."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged = -1
    deadline = time.monotonic() + timeout_s
    while acknowledged < at_least and time.monotonic() < deadline:
        line = child.stdout.readline()
        if line:
            acknowledged = int(line)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert acknowledged >= at_least, "writer made too little progress"
    return acknowledged
