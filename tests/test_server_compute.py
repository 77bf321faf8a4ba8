"""A `memlayer serve` worker runs its numeric libraries on `compute_threads` threads, in every
thread it starts (a one-query thread team only waits for cores that other requests hold)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

_WORKER = """
import json, sys, threading
from fastapi.testclient import TestClient
from memlayer.integrations.server.app import app_from_env

with TestClient(app_from_env()) as client:
    assert client.get("/readyz").status_code == 200
    import faiss, torch
    from threadpoolctl import threadpool_info
    seen = {}

    def request_thread():
        seen["faiss"] = faiss.omp_get_max_threads()
        seen["torch"] = torch.get_num_threads()
        seen["pools"] = sorted({pool["num_threads"] for pool in threadpool_info()})

    thread = threading.Thread(target=request_thread)
    thread.start()
    thread.join()
    print(json.dumps(seen))
"""


def _worker_threads(tmp_path: Path) -> dict:
    env = {
        **{k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")},
        "MEMLAYER_DATA_DIR": str(tmp_path / "store"),
        "MEMLAYER_EMBEDDER": "hash",
    }
    done = subprocess.run(
        [sys.executable, "-c", _WORKER], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_worker_computes_on_one_thread_by_default(tmp_path: Path) -> None:
    assert _worker_threads(tmp_path) == {"faiss": 1, "torch": 1, "pools": [1]}
