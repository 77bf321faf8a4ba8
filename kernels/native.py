"""C kernels compiled on first use with the system's C compiler, for this CPU, and cached.

A library is built once per source, compiler and CPU (`-march=native`: it runs only where
the instruction set flags match) under MEMLAYER_KERNEL_CACHE, else ~/.cache/memlayer; with
OpenMP where the compiler has it. Where no compiler works, `build` returns None and callers
keep their torch reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
_log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where compiled kernels are kept: MEMLAYER_KERNEL_CACHE, else the user's cache."""
    chosen = os.environ.get("MEMLAYER_KERNEL_CACHE")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memlayer" / "kernels"


def _cpu_id() -> str:
    """This CPU's model and instruction set flags (a library built with -march=native runs
    only where they match)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(wanted)))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction set flags as /proc/cpuinfo lists them (empty where it cannot
    be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _compile(compiler: str, source: Path, target: Path) -> bool:
    """Build the library at `target`, with OpenMP where the compiler has it (else one
    thread); False when neither build works."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for openmp in (("-fopenmp",), ()):
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            command = [compiler, *_FLAGS, *openmp, str(source), "-o", str(built), "-lm"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as exc:
                _log.info("memlayer: %s failed: %s", command[0], exc)
                return False
            if done.returncode == 0:
                os.replace(built, target)  # atomic: a concurrent process sees all or nothing
                return True
            _log.info("memlayer: %s failed: %s", " ".join(command), done.stderr.strip())
    return False


def build(source: Path) -> ctypes.CDLL | None:
    """The library compiled from `source` (built once per source, compiler and CPU), or None
    where it cannot be built: no C compiler, or a read-only cache."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _log.warning(
            "memlayer: no C compiler found; %s's kernels use the torch reference", source.name
        )
        return None
    digest = hashlib.sha256()
    for part in (source.read_bytes(), compiler.encode(), " ".join(_FLAGS).encode()):
        digest.update(part)
    digest.update(_cpu_id().encode())
    target = cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    try:
        if not target.exists() and not _compile(compiler, source, target):
            _log.warning("memlayer: %s did not build; its kernels use the reference", source.name)
            return None
        return ctypes.CDLL(str(target))
    except OSError as exc:
        _log.warning(
            "memlayer: %s's kernels are not usable (%s); using the reference", source.name, exc
        )
        return None
