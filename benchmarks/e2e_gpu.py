"""End to end on CUDA: dense attention vs KVSession, speed and GPU memory per context length.

The model is a real transformers Llama with random bf16 weights in a published shape
(`--shape smollm2`: SmolLM2-135M, 30 layers, 9 query / 3 KV heads of 64; `llama3-8b`: 32
layers, 32 / 8 heads of 128): time and memory do not depend on the weights. Accuracy is
passkey.py's job. For each context length, in one run:
  dense     the HF model with a DynamicCache: one prefill forward (last token's logits
            only), then greedy one-token forwards;
  dense-no-cudnn  the same with SDPA's cuDNN backend ruled out (on the lent H200 its host
            cost per call was 60% of a dense decode step's host time);
  infllm,   KVSession with that selector and its default span (2K tokens): feed in chunks,
  quest     then greedy tokens through `continue_ids`.
  infllm-bus  InfLLM with scattered promotions gathered by one kernel over the bus, not
            copied run by run by the copy engine (`tensor_tier.GATHER_OVER_BUS`): its A/B.
Prefill is tokens/s over the synchronised wall time; decode is ms per generated token (mean
over the tokens; dense also gives its median); memory is torch's peak allocation. A
KVSession row also records its selection hit rate (the share of selected pages already on
the GPU) and the pages, bytes and seconds its store moved between tiers.

    python benchmarks/e2e_gpu.py --shape smollm2 --contexts 8k 32k 128k --out results.json
    python benchmarks/e2e_gpu.py --shape llama3-8b --contexts 512k --methods infllm \
        --chunk-size 2048 --gpu-budget 8GiB     # the issue's 512K row: pages past 8 GiB in RAM
    python benchmarks/e2e_gpu.py --tiny        # a 2-layer model on the CPU: smoke-tests the script
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from memlayer.stores import tensor_tier

CONTEXTS = {"2k": 2048, "8k": 8192, "32k": 32768, "128k": 131072, "512k": 524288}
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# every SDPA backend but cuDNN attention, whose host cost per call dominated a dense decode
# step on the lent H200
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def random_model(shape: str) -> Any:
    """A Llama of `shape` with random weights, built directly on the device in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape])
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with DEVICE:
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    synchronize()
    started = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - started


def run_dense(
    model: Any, context: list[int], new_tokens: int, cudnn: bool = True
) -> dict[str, float]:
    from transformers import DynamicCache

    from memlayer.kvretrieval.model import cache_argument

    cache = {cache_argument(model): DynamicCache(config=model.config)}
    with torch.no_grad(), sdpa_kernel(NO_CUDNN) if not cudnn else contextlib.nullcontext():
        out, prefill_s = timed(
            lambda: model(torch.tensor([context], device=DEVICE), logits_to_keep=1, **cache)
        )
        token, times = int(out.logits[0, -1].argmax()), []
        for _ in range(new_tokens):
            out, seconds = timed(
                lambda t=token: model(torch.tensor([[t]], device=DEVICE), **cache)  # type: ignore[misc]
            )
            token = int(out.logits[0, -1].argmax())
            times.append(seconds)
    return {
        "prefill_tok_s": len(context) / prefill_s,
        "decode_ms": 1000 * statistics.fmean(times),
        "decode_median_ms": 1000 * statistics.median(times),
    }


def run_memlayer(
    model: Any,
    context: list[int],
    new_tokens: int,
    selector: str,
    chunk_size: int = 512,
    gpu_budget: str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    from memlayer import KVSession

    session = KVSession(
        model,
        None,
        chat=False,
        progress=progress,
        selector=selector,
        chunk_size=chunk_size,
        gpu_budget=gpu_budget,
    )
    _, prefill_s = timed(lambda: session.feed(context))
    session.continue_ids([1], new_tokens)
    stats = session.stats()
    return {
        "prefill_tok_s": len(context) / prefill_s,
        "decode_ms": 1000 * stats["decode_s"] / stats["decode_tokens"],
        "selection_hit_rate": stats["selection_hit_rate"],
        "moved": stats["moved"],
    }


def machine() -> dict[str, Any]:
    import transformers

    found = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if DEVICE.type == "cuda":
        import triton

        props = torch.cuda.get_device_properties(0)
        found |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
        found["triton"] = triton.__version__
    return found


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")


def profile(model: Any, context: list[int], path: Path) -> None:
    """Torch profiler table of one KVSession chunk over `context` (where the time goes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from memlayer import KVSession

    session = KVSession(model, None, chat=False, progress=False)
    session.feed(context)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        session.feed(context[: session.config.chunk_size])
        synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    path.write_text(table + "\n")


def host_profile(
    model: Any, context: list[int], path: Path, chunk_size: int, gpu_budget: str | None
) -> None:
    """cProfile of an InfLLM KVSession's prefill over `context` (where the host's time goes:
    waits on the GPU show up in the calls that read from it)."""
    import cProfile
    import io
    import pstats

    from memlayer import KVSession

    session = KVSession(
        model, None, chat=False, progress=False, chunk_size=chunk_size, gpu_budget=gpu_budget
    )
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(session.feed, context)
    synchronize()
    seconds = time.perf_counter() - started
    out = io.StringIO()
    out.write(f"{len(context)} tokens in {seconds:.1f} s under cProfile; moved:\n")
    out.write(json.dumps(session.stats()["moved"], indent=1) + "\n")
    for key in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(45)
    path.write_text(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="smollm2", choices=SHAPES)
    parser.add_argument("--contexts", nargs="+", default=["8k", "32k", "128k"], choices=CONTEXTS)
    parser.add_argument(
        "--methods", nargs="+", default=["dense", "dense-no-cudnn", "infllm", "quest"]
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--chunk-size", type=int, default=512, help="KVSession's prefill chunk (its default: 512)"
    )
    parser.add_argument(
        "--gpu-budget", help="bound KVSession's GPU tier (e.g. 8GiB): the rest in pinned RAM"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shape, 2K, 4 tokens; CPU ok")
    parser.add_argument(
        "--progress", action="store_true", help="a progress bar over each KVSession's feed"
    )
    parser.add_argument("--profile", type=Path, help="also write a profile of one chunk here")
    parser.add_argument(
        "--cprofile", type=Path, help="also write a cProfile of an InfLLM prefill here"
    )
    parser.add_argument(
        "--cprofile-tokens", type=int, default=131072, help="the profiled prefill's length"
    )
    parser.add_argument("--out", type=Path, help="JSON file for the rows")
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.contexts, args.new_tokens = "tiny", ["2k"], 4
    elif DEVICE.type != "cuda":
        sys.exit("e2e_gpu.py: needs a CUDA GPU (or --tiny to smoke-test on the CPU)")

    model = random_model(args.shape)  # one copy serves both: a KVSession's routing is per forward
    run_dense(model, list(range(1000, 1512)), 4)  # warm-up: kernels, cuBLAS handles, Triton JIT
    run_memlayer(model, list(range(1000, 3048)), 4, "infllm")
    run_memlayer(model, list(range(1000, 3048)), 4, "quest")
    rows = []
    generator = torch.Generator().manual_seed(1)
    for name in args.contexts:
        context = torch.randint(100, 49000, (CONTEXTS[name],), generator=generator).tolist()
        for method in args.methods:
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if method in ("dense", "dense-no-cudnn"):
                row = run_dense(model, context, args.new_tokens, cudnn=method == "dense")
            else:
                default, tensor_tier.GATHER_OVER_BUS = (
                    tensor_tier.GATHER_OVER_BUS,
                    method.endswith("-bus"),
                )
                row = run_memlayer(
                    *(model, context, args.new_tokens, method.removesuffix("-bus")),
                    *(args.chunk_size, args.gpu_budget, args.progress),
                )
                tensor_tier.GATHER_OVER_BUS = default
                row |= {"chunk_size": args.chunk_size, "gpu_budget": args.gpu_budget}
            row = {"context": name, "method": method, **row}
            row["peak_gib"] = peak_gib()
            rows.append(row)
            print(
                f"{name:>5} {method:>7}  prefill {row['prefill_tok_s']:>9.0f} tok/s  "
                f"decode {row['decode_ms']:>7.2f} ms/tok  peak {row['peak_gib']:>6.2f} GiB",
                flush=True,
            )
    if args.profile:
        profile(model, context, args.profile)
    if args.cprofile:
        host_profile(
            *(model, context[: args.cprofile_tokens], args.cprofile),
            *(args.chunk_size, args.gpu_budget),
        )
    record = {
        "command": shlex.join(["python", "benchmarks/e2e_gpu.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "model": {"shape": args.shape, "weights": "random", "dtype": "bfloat16"},
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
