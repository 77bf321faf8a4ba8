"""`make gpu`: the CUDA tests and every GPU benchmark in one run, with dated rows for RESULTS.md.

Steps (each in its own process, each bounded by --timeout; a failed step does not stop the
rest): `tests` (pytest -m gpu), `kernels` (benchmarks/kernels.py), `store`
(benchmarks/store_bench.py), `e2e` (benchmarks/e2e_gpu.py, SmolLM2 shape), `host`
(benchmarks/gpu_host.py: a decode step's host and device time, dense and memlayer), `e2e-8b`
(e2e_gpu.py, Llama-3-8B shape at 32K and 128K, dense and InfLLM), `e2e-512k` (the same
shape at 512K through InfLLM in 2,048-token chunks, the GPU tier bounded to 8 GiB and the
rest in pinned RAM: the issue's 512K targets), `video`
(video_stream.py: a 1-hour stream at 1 frame/s through a LLaVA-OneVision-0.5B shape, memlayer
vs dense attention), `video-qwen` (the same through a Qwen2-VL-2B shape), `faiss`
(faiss_gpu.py: the vector index's search at 1M vectors on the CPU and on the GPU, side by
side; needs faiss-gpu in place of faiss-cpu). The tests run on
pytest-xdist's workers when it is installed (Triton compiles each case on the host).
JSON goes to --out-dir; a dated Markdown summary (the GPU's name, each step's outcome, the
e2e rows) is written beside it and appended to RESULTS.md. Without CUDA it says so and
exits 0: there is nothing to measure. On a short GPU lease, `--deadline` bounds the whole run
(each step gets what is left, at most --timeout; a step with no time left is skipped) and
`--quick` runs the kernel grid's 32K/128K corner, e2e at 8K and 32K and a 10-minute video.

    python benchmarks/gpu.py                          # everything
    python benchmarks/gpu.py --steps tests e2e --out-dir /tmp/gpu
    python benchmarks/gpu.py --quick --deadline 480   # a 10-minute lease
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
STEPS = [
    "tests",
    "kernels",
    "store",
    "e2e",
    "host",
    "e2e-8b",
    "e2e-512k",
    "video",
    "video-qwen",
    "faiss",
]


def commands(
    steps: list[str], tests: list[str], out: Path, stamp: str, quick: bool = False
) -> dict[str, list[str]]:
    py = sys.executable
    xdist = ["-n", "auto"] if importlib.util.find_spec("xdist") else []
    e2e = [py, str(HERE / "e2e_gpu.py")]
    every = {
        "tests": [py, "-P", "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", *xdist, *tests],
        "kernels": [
            *(py, str(HERE / "kernels.py"), *(["--quick"] if quick else [])),
            *("--out", str(out / f"kernels-{stamp}.json")),
        ],
        "store": [py, str(HERE / "store_bench.py"), "--out", str(out / f"store-{stamp}.json")],
        "e2e": [
            *e2e,
            *("--shape", "smollm2", *(["--contexts", "8k", "32k"] if quick else [])),
            *("--out", str(out / f"e2e-smollm2-{stamp}.json")),
            *("--profile", str(out / f"e2e-profile-{stamp}.txt")),
        ],
        "e2e-8b": [
            *e2e,
            *("--shape", "llama3-8b", "--contexts", "32k", "128k"),
            *("--methods", "dense", "dense-no-cudnn", "infllm"),
            *("--out", str(out / f"e2e-llama3-8b-{stamp}.json")),
        ],
        "e2e-512k": [
            *(*e2e, "--shape", "llama3-8b", "--contexts", "512k", "--methods", "infllm"),
            *("--chunk-size", "2048", "--gpu-budget", "8GiB", "--new-tokens", "16", "--progress"),
            *("--out", str(out / f"e2e-llama3-8b-512k-{stamp}.json")),
        ],
    }
    minutes = ("--minutes", "10", "--every-minutes", "2") if quick else ("--minutes", "60")
    every["video"] = [
        *(py, str(HERE / "video_stream.py"), "--part", "vlm", "--shape", "0.5b", *minutes),
        *("--json", str(out / f"video-0.5b-{stamp}.json")),
    ]
    every["video-qwen"] = [
        *(py, str(HERE / "video_stream.py"), "--part", "vlm", "--family", "qwen2-vl"),
        *("--shape", "2b", *minutes, "--json", str(out / f"video-qwen2-vl-2b-{stamp}.json")),
    ]
    every["faiss"] = [py, str(HERE / "faiss_gpu.py"), "--out", str(out / f"faiss-gpu-{stamp}.json")]
    every["host"] = [
        *(py, str(HERE / "gpu_host.py"), "--out", str(out / f"gpu-host-{stamp}.json")),
        *("--profile", str(out / f"gpu-host-prefill-profile-{stamp}.txt")),
    ]
    return {step: every[step] for step in steps}


def run(name: str, command: list[str], timeout: float) -> tuple[str, float]:
    """Run one step with its output streamed; its outcome ('ok', 'failed (rc N)', 'timed out',
    'skipped: no time left')."""
    if timeout <= 0:
        return "skipped: no time left", 0.0
    print(f"== {name} (at most {timeout:.0f} s): {' '.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        rc = subprocess.run(command, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "timed out", time.perf_counter() - started
    return ("ok" if rc == 0 else f"failed (rc {rc})"), time.perf_counter() - started


def e2e_table(path: Path) -> list[str]:
    """Markdown rows of one e2e JSON file (absent when the step wrote none)."""
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    lines = [
        f"`{record['command']}` (model shape {record['model']['shape']}, random bf16 weights)",
        "",
        "| context | method | prefill tok/s | decode ms/token | peak GPU GiB |",
        "|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        lines.append(
            f"| {row['context']} | {row['method']} | {row['prefill_tok_s']:.0f} | "
            f"{row['decode_ms']:.1f} | {row['peak_gib']:.2f} |"
        )
    return [*lines, ""]


def faiss_table(path: Path) -> list[str]:
    """Markdown rows of the faiss_gpu JSON file (absent when the step wrote none)."""
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    lines = [
        f"`{record['command']}` ({record['vectors']:,} x {record['dim']}-d, "
        f"{record['queries']:,} queries, FAISS {record['faiss']}, "
        f"{record['cpu_threads']} CPU threads)",
        "",
        "| index | setting | device | recall@10 | p50 ms | p95 ms | batch queries/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        head = f"| {row['index']} | {row['setting']} | {row['device']} |"
        if "note" in row:
            lines.append(f"{head} {row['note']} | | | |")
            continue
        lines.append(
            f"{head} {row['recall']:.3f} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | "
            f"{row['batch_qps']:,.0f} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    parser.add_argument("--tests", nargs="+", default=["tests"], help="paths pytest collects")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per step")
    parser.add_argument("--deadline", type=float, help="seconds for the whole run")
    parser.add_argument("--quick", action="store_true", help="smaller kernel and e2e grids")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("make gpu: no CUDA device here; nothing was run or measured.")
        return
    gpu = torch.cuda.get_device_name()
    now = datetime.datetime.now().astimezone()
    stamp = f"{gpu.split()[-1].lower()}-{now:%Y%m%d-%H%M}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    planned = commands(args.steps, args.tests, args.out_dir, stamp, args.quick)
    outcomes = {}
    for step, command in planned.items():
        left = args.timeout
        if args.deadline is not None:
            left = min(left, args.deadline - (time.monotonic() - started))
        outcomes[step] = run(step, command, left)
    summary = [f"### make gpu, {now:%Y-%m-%d %H:%M %Z}, {gpu} (torch {torch.__version__})", ""]
    summary += [
        f"- {step}: {outcome} in {seconds:.0f} s" for step, (outcome, seconds) in outcomes.items()
    ]
    summary.append("")
    for name in (
        f"e2e-smollm2-{stamp}.json",
        f"e2e-llama3-8b-{stamp}.json",
        f"e2e-llama3-8b-512k-{stamp}.json",
    ):
        summary += e2e_table(args.out_dir / name)
    summary += faiss_table(args.out_dir / f"faiss-gpu-{stamp}.json")
    text = "\n".join(summary) + "\n"
    (args.out_dir / f"gpu-{stamp}.md").write_text(text)
    with args.results_md.open("a") as handle:
        handle.write("\n" + text)
    print(text)
    sys.exit(0 if all(outcome == "ok" for outcome, _ in outcomes.values()) else 1)


if __name__ == "__main__":
    main()
