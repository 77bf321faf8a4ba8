"""The memory service for tests: in process (FastAPI's TestClient) or as a real `memlayer
serve` process on a free loopback port, and tenants with keys made through the admin API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ADMIN = "test-admin-token"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def db_argument(location: dict[str, Any]) -> str:
    """`memlayer serve --db` for a test store location (a folder, or a database URL)."""
    return str(location.get("url") or location["path"])


def start(
    db: str, *, workers: int = 1, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[Any], str]:
    """Start `memlayer serve` on `db` and wait until it is ready: its process and base URL.

    The server runs in its own process group, so ending it (or SIGKILLing it, see `kill`)
    takes its worker processes too."""
    port = free_port()
    environment = {
        **os.environ,
        "MEMLAYER_ADMIN_TOKEN": ADMIN,
        "MEMLAYER_EMBEDDER": "hash",
        "MEMLAYER_SERVER_RATE_PER_S": "0",
        **(env or {}),
    }
    command = [sys.executable, "-m", "memlayer.cli", "serve", "--port", str(port), "--db", db]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"memlayer-serve-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, "--workers", str(workers)],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, str(log))
    except BaseException:
        kill(process)
        raise
    return process, url


@contextmanager
def serve(db: str, *, workers: int = 1, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `memlayer serve` on `db` until the block ends; yields its base URL once ready."""
    process, url = start(db, workers=workers, env=env)
    try:
        yield url
    finally:
        kill(process, signal.SIGTERM)


def wait_ready(url: str, process: subprocess.Popen[Any], log: str, timeout_s: float = 90) -> None:
    """Wait until the server answers /readyz (or fail with its log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"memlayer serve exited: {Path(log).read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"memlayer serve not ready: {Path(log).read_text()[-3000:]}")


def kill(process: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Send `sig` to the server's whole process group and wait for it to end."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def new_tenant(client: httpx.Client, base: str = "") -> tuple[str, dict[str, str]]:
    """A new tenant and the headers of a fresh API key of it."""
    tenant = client.post(f"{base}/v1/tenants", json={}, headers=ADMIN_HEADERS)
    assert tenant.status_code == 201, tenant.text
    tenant_id = tenant.json()["tenant_id"]
    key = client.post(f"{base}/v1/tenants/{tenant_id}/keys", json={}, headers=ADMIN_HEADERS)
    assert key.status_code == 201, key.text
    return tenant_id, {"Authorization": f"Bearer {key.json()['api_key']}"}
