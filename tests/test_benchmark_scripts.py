"""The GPU benchmark scripts run end to end on the CPU (`--tiny`), so a GPU lease never finds
them broken; `make gpu` without CUDA says so and exits 0."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="make gpu measures on a CUDA machine"
)
def test_make_gpu_without_cuda_says_so_and_exits_0(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    done = _run("gpu.py", "--out-dir", str(tmp_path), "--results-md", str(results))
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    assert not results.exists()  # nothing measured, nothing recorded


def test_e2e_tiny_measures_dense_and_both_selectors(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    done = _run("e2e_gpu.py", "--tiny", "--chunk-size", "1024", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["method"] for row in rows] == ["dense", "dense-no-cudnn", "infllm", "quest"]
    assert all(_positive(row["prefill_tok_s"]) and _positive(row["decode_ms"]) for row in rows)
    assert [row.get("chunk_size") for row in rows] == [None, None, 1024, 1024]


def test_faiss_gpu_tiny_measures_the_cpu_index_beside_the_gpu_column(tmp_path: Path) -> None:
    out = tmp_path / "faiss.json"
    done = _run("faiss_gpu.py", "--tiny", "--vectors", "8000", "--queries", "20", "--out", str(out))
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(row["index"], row["device"]) for row in rows] == [
        ("ivf", "cpu"),
        ("ivf", "cuda"),
        ("flat", "cpu"),
        ("flat", "cuda"),
    ]
    assert rows[0]["setting"].startswith("nprobe ") and rows[2]["setting"] == "exact"
    assert rows[2]["recall"] == 1.0  # exact search against exact search
    for row in rows:
        if row["device"] == "cuda" and record["gpu"] is None:
            assert row["note"] == "not measured: no CUDA FAISS"
            continue
        assert 0 < row["recall"] <= 1
        assert all(_positive(row[key]) for key in ("p50_ms", "p95_ms", "batch_qps"))
    assert "not measured: no CUDA FAISS" in done.stdout or record["gpu"] is not None
    make_gpu = _module("gpu.py")  # `make gpu` runs it, and its summary shows the rows
    command = make_gpu.commands(["faiss"], ["tests"], tmp_path, "stamp")["faiss"]
    assert command[1:] == [
        str(BENCHMARKS / "faiss_gpu.py"),
        "--out",
        str(tmp_path / "faiss-gpu-stamp.json"),
    ]
    assert len([line for line in make_gpu.faiss_table(out) if line.startswith("| ivf")]) == 2


def _module(script: str) -> Any:
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), BENCHMARKS / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_tiny_measures_every_path(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    done = _run("kernels.py", "--tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {row["model"] for row in rows} == {"llama3-8b", "smollm2"}
    for row in rows:
        assert all(_positive(row[key]) for key in ("dense_ms", "sparse_ms", "naive_ms"))
        assert row["sparse_bytes"] < row["dense_bytes"]


def test_store_bench_small_run_compares_with_raw_copies(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    done = _run("store_bench.py", "--pages", "16", "--repeats", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    for key in ("promotion", "promotion_scattered", "disk_read"):
        assert _positive(results[key]["ours_s"]) and _positive(results[key]["baseline_s"])
    assert _positive(results["disk_read"]["raw_threads_s"])
    assert results["disk_read"]["read_threads"] == 2


def test_crag_eval_small_run_compares_ranked_and_crag(tmp_path: Path) -> None:
    out = tmp_path / "crag.json"
    done = _run(
        "crag_eval.py",
        *("--subjects", "2", "--per-subject", "30", "--ks", "2", "8", "--budgets", "64", "128"),
        *("--corpora", "reviews", "chats"),  # tickets stays held out: the tests never see it
        *("--llm-questions", "1", "--llm-settings", "ranked k=2", "crag 64"),
        *("--timing-items", "60", "--timing-repeats", "1", "--out", str(out)),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    for run in report["corpora"].values():
        assert set(run["rows"]) == {"ranked k=2", "ranked k=8", "crag 64", "crag 128"}
        for row in run["rows"].values():
            assert all(0 <= r <= 1 for r in row["recall"])
            if row["strategy"] == "crag":
                assert max(row["tokens"]) <= row["value"]
        assert set(run["answers"]) == {"ranked k=2", "crag 64"}
    assert _positive(report["timing"]["pack_warm_ms"]["p95"])
    assert _positive(report["timing"]["context_call_widening_ms"]["p95"])
    assert report["timing"]["widen_asked"][0] == 50  # the default rule starts at 50


def test_service_load_small_run_measures_closed_and_open_loop(tmp_path: Path) -> None:
    out = tmp_path / "service.json"
    done = _run(
        "service_load.py",
        *("--backends", "sqlite", "--workers", "1", "--clients", "2", "--rates", "20"),
        *("--stored", "100", "--duration", "1", "--no-kill", "--compute-threads", "2", "1"),
        *("--preload", "bulk", "--warmup", "10", "--floor", "--out", str(out)),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    for row in (*report["rows"], *report["open_rows"]):
        assert row["requests_ok"] > 0 and row["errors"] == {} and row["cross_tenant_hits"] == 0
        assert _positive(row["latency_ms"]["search"]["p95"])
    assert [row["offered_rps"] for row in report["open_rows"]] == [20, 20]
    assert [row["compute_threads"] for row in report["rows"]] == [2, 1]
    assert {row["preload"] for row in report["rows"]} == {"bulk"}
    assert [row["clients"] for row in report["floor_rows"]] == [2, 2]
    assert all(_positive(row["latency_ms"]["healthz"]["p95"]) for row in report["floor_rows"])


def test_group_commit_small_run_compares_alone_and_grouped(tmp_path: Path) -> None:
    out = tmp_path / "group.json"
    done = _run(
        "group_commit.py", "--threads", "1", "4", "--adds", "8", "--repeats", "1", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    runs = json.loads(out.read_text())["runs"]
    assert {(r["threads"], r["grouped"]) for r in runs} == {
        (1, False),
        (1, True),
        (4, False),
        (4, True),
    }
    assert all(r["transactions"] == r["adds"] for r in runs if not r["grouped"])
    assert all(_positive(r["adds_per_s"]) for r in runs)


def test_retrolm_eval_tiny_trains_and_compares_every_method(tmp_path: Path) -> None:
    out = tmp_path / "retrolm.json"
    done = _run(
        "retrolm_eval.py",
        *("--tiny", "--eval-tokens", "300", "--facts", "6", "--questions", "2"),
        *("--train-contexts", "2", "--train-tokens", "200", "--train-facts", "4", "--steps", "5"),
        *("--n-init", "4", "--n-local", "16", "--block-size", "8", "--topk", "2"),
        *("--new-tokens", "2", "--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [row["method"] for row in rows] == ["infllm", "quest", "retrolm", "retrolm-trained"]
    assert all(row["asked"] == 2 and 0 <= row["answer_page_attended"] <= 1 for row in rows)
    # one selection per question: a layer attends to topk context pages, no more
    assert [row["pages_per_layer"] for row in rows[2:]] == [2.0, 2.0]
    assert _positive(report["training"]["seconds"])


def test_shared_context_tiny_compares_a_reopened_context_with_re_prefill(tmp_path: Path) -> None:
    out = tmp_path / "shared.json"
    done = _run(
        "shared_context.py",
        *("--tiny", "--tokens", "1200", "--questions", "3", "--selectors", "infllm", "quest"),
        *("--n-local", "64", "--block-size", "16", "--topk", "4", "--n-init", "8"),
        *("--chunk-size", "128", "--reprefill", "1", "--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["method"] for row in rows] == ["dense", "infllm", "quest"]
    for row in rows[1:]:
        assert row["questions"] == 3 and row["reprefill_agree"] == "1/1"
        assert 0 < row["read_per_step"] <= 1 and 0 < row["touched_fraction"] <= 1
        assert all(_positive(row[key]) for key in ("encode_s", "first_ttft_s", "ttft_s"))
        assert row["bytes"]["context"] > 0


def test_decode_step_tiny_times_every_part_beside_dense_references(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    done = _run(
        "decode_step.py",
        *("--tiny", "--tokens", "1200", "--threads", "1", "--repeats", "5", "--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    rows = {row["what"]: row for row in json.loads(out.read_text())["rows"]}
    parts = ("placed", "select", "slots", "sparse", "attend_resident", "append")
    references = ("sdpa floor", "sdpa same keys", "copy same bytes")
    assert set(rows) == {*parts, *references}
    assert all(
        _positive(row["min_us"]) and row["min_us"] <= row["median_us"] for row in rows.values()
    )
    assert rows["sdpa floor"]["keys"] == 512
    assert rows["sdpa same keys"]["keys"] == rows["sparse"]["keys"] > 512


def test_decode_ratio_tiny_interleaves_floor_dense_and_both_selectors(tmp_path: Path) -> None:
    out = tmp_path / "ratio.json"
    done = _run(
        "decode_ratio.py",
        *("--tiny", "--lengths", "2k", "--rounds", "2", "--tokens", "2", "--json", str(out)),
        *("--page-dtypes", "auto", "model", "--prefill-rounds", "3"),
        *("--attention-dtypes", "bfloat16", "model"),
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    variants = ["", " f32 products", " model pages", " model pages f32 products"]
    methods = ["floor", "dense"] + [s + v for s in ("infllm", "quest") for v in variants]
    assert [(row["phase"], row["method"]) for row in rows] == [
        (phase, method) for phase in ("decode", "prefill") for method in methods
    ]
    for row in rows:
        assert len(row["rounds_ms"]) == (2 if row["phase"] == "decode" else 3)
        assert row["median_ms"] > 0
    for floor in (rows[0], rows[len(methods)]):
        assert floor["ratio_to_floor"] == floor["ratio_per_round"] == 1.0


def test_faiss_threads_small_run_compares_both_with_and_without_a_neighbour(
    tmp_path: Path,
) -> None:
    out = tmp_path / "threads.json"
    done = _run("faiss_threads.py", "--sizes", "300", "--queries", "5", "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["busy"], r["system"]) for r in rows} == {
        (busy, system) for busy in (False, True) for system in ("faiss", "memlayer")
    }
    assert all(_positive(r["p50_ms"]) and r["p95_ms"] >= r["p50_ms"] for r in rows)


@pytest.mark.postgres
def test_memory_bench_small_run_measures_every_memlayer_backend(tmp_path: Path) -> None:
    """The 1M PostgreSQL measurement takes an hour to load: its script is smoke-tested at 2K."""
    out = tmp_path / "memory.json"
    systems = ("memlayer-index", "memlayer-memory", "memlayer-postgres", "faiss-flat")
    done = _run(
        "memory_bench.py", "--sizes", "2k", "--systems", *systems, "--queries", "5",
        "--tmp", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["runs"][0]["results"]
    names = [r["system"] for r in results]
    assert names == [
        "memlayer VectorIndex",
        "memlayer Memory",
        "memlayer Memory (PostgreSQL)",
        "faiss IndexFlatIP",
    ]
    for result in results:
        assert result["curve"] and all(0.0 <= p["recall"] <= 1.0 for p in result["curve"])
        assert all(_positive(p["p50_ms"]) for p in result["curve"])
    postgres = {p["setting"]: p for p in results[2]["curve"]}
    assert any("filter 1%" in s for s in postgres) and any("8 clients" in s for s in postgres)
    keyed = [p for s, p in postgres.items() if "filter index" in s]
    assert len(keyed) == 2 and all(p["recall"] == 1.0 for p in keyed)  # exact: every match


def test_gpu_host_tiny_profiles_dense_and_memlayer_steps(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    done = _run("gpu_host.py", "--tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert _positive(record["launch_us"]) and _positive(record["python_step_ns"])
    steps = [record["dense_step"], record["dense_step_no_cudnn"], record["memlayer"]["decode_step"]]
    for step in steps:
        assert _positive(step["wall_ms"]) and _positive(step["host_ms"])
        assert step["ops_per_layer"] > 0 and 0 < step["top_host_share"] <= 1
    assert set(record["memlayer"]["prefill_tok_s_by_chunk"]) == {"512", "2048"}
    assert all(_positive(v) for v in record["memlayer"]["prefill_tok_s_by_chunk"].values())
    assert "| memlayer |" in done.stdout
