"""Streaming video QA (ReKV, issue 18): `VideoSession` against dense attention, and SmolLM2 on
a stream of timestamped text frames.

`--part vlm`: a synthetic stream at 1 frame/s (moving squares, generated live, never held
whole) through a random-weight LLaVA-OneVision of the `--shape` given (`tiny`: the CPU
shape; `0.5b`: llava-onevision-qwen2-0.5b's shape, for a GPU), or with `--family qwen2-vl`
a random-weight Qwen2-VL (`tiny`; `2b`: Qwen2-VL-2B-Instruct's shape at 392-px frames).
The session encodes chunk by chunk with sliding-window attention, pages bounded in the
front tier, the rest offloaded to disk; the baseline is the same model with its own
attention and a dense KV cache of the whole video (until it runs out of memory). Reports
encoding frames/s, memory over time (the process's RSS, the page store's tiers, the dense
KV cache; on CUDA the GPU's allocated bytes) and the time to the first answer token for
questions asked at the end.

`--part text`: SmolLM2-135M-Instruct reads an event log of `--frames` text frames (one
frame of 32 tokens every 2 s; planted events, see event_log.py) and answers, for each
planted event, a question about the event at its time, from the frames it retrieves
(`--format code`, default: the event's frame reads "The code at H:MM:SS is Falcon-4821.",
the cue "The code at H:MM:SS is", correct when the answer holds the code; `what`: the cue
"[H:MM:SS]", correct when the answer holds the event's key words; `paren`, `at`, `line`:
the older "at what time did ...?" questions, correct when the answer starts with the
event's time). Also reported: the answer's first citation (the retrieved frame the answer
read most), and the event's frame among the frames retrieved by most layers and by any.
With `--dense-frames N` the same model first answers the same questions densely (its own
attention, everything in context) over short logs of N frames written the same way: the
baseline where dense attention fits.

    python benchmarks/video_stream.py --part vlm --minutes 60
    python benchmarks/video_stream.py --part text --frames 2000 --events 40
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from event_log import Event, event_log

from memlayer import VideoSession
from memlayer.frame_retrievers import TextFrameRetriever
from memlayer.kvretrieval.frame_encoders import image_frames
from memlayer.kvretrieval.model import cache_argument
from memlayer.video_input import clock

RESULTS = Path(__file__).parent / "results"
# the tiny language side both families share: 4 layers x 256, 8 heads, 2 KV heads
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
)
SHAPES: dict[str, dict[str, Any]] = {
    # CPU: 112-px frames -> 8x8 patches -> 16 tokens per frame after 2x2 pooling
    "tiny": {
        "vision": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
        ),
        "image_size": 112,
        "text": dict(TINY_TEXT, head_dim=32),
    },
    # llava-onevision-qwen2-0.5b-ov: SigLIP-400M at 384 px (196 tokens per frame), Qwen2-0.5B
    "0.5b": {
        "vision": dict(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16
        ),
        "image_size": 384,
        "text": dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            head_dim=64,
        ),
    },
}
# Qwen2-VL: frames of `image_size` px, 14-px patches merged 2 x 2 (tiny: 112 px -> 16 tokens)
QWEN_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": dict(depth=2, embed_dim=64, hidden_size=256, num_heads=2, mlp_ratio=2),
        "image_size": 112,
        "text": dict(
            TINY_TEXT,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        ),
    },
    # Qwen2-VL-2B-Instruct: a 675M ViT, Qwen2-1.5B's language side; 392 px: 196 tokens a frame
    "2b": {
        "vision": dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        "image_size": 392,
        "text": dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
        ),
    },
}
QUESTION = "Describe what the blue square did at the start of the video."


def rss_mb() -> float:
    """The process's resident memory now (MB)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def gpu_mb() -> float | None:
    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None


def shape_spec(family: str, shape: str) -> dict[str, Any]:
    """The shape's sizes for the model family (SystemExit naming the shapes it has)."""
    shapes = QWEN_SHAPES if family == "qwen2-vl" else SHAPES
    if shape not in shapes:
        raise SystemExit(f"--shape for --family {family}: one of {sorted(shapes)}")
    return shapes[shape]


def random_vlm(shape: str, device: str, family: str = "llava") -> tuple[Any, Any]:
    """A random-weight LLaVA-OneVision (or Qwen2-VL) of `shape` and a byte-level tokenizer."""
    import transformers as tf

    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from video_models import VOCAB, byte_tokenizer

    spec = shape_spec(family, shape)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if family == "qwen2-vl":
        qwen = tf.Qwen2VLConfig(
            text_config=dict(
                vocab_size=VOCAB,
                max_position_embeddings=32768,
                bos_token_id=None,
                eos_token_id=256,  # the byte tokenizer's <eos>
                **spec["text"],
            ),
            vision_config=dict(**spec["vision"], patch_size=14, spatial_merge_size=2),
            image_token_id=VOCAB - 2,
            video_token_id=VOCAB - 1,
        )
        qwen._attn_implementation = "sdpa"
        vlm: Any = tf.Qwen2VLForConditionalGeneration(qwen)
        return vlm.to(device=device, dtype=dtype).eval(), byte_tokenizer()
    vision = tf.SiglipVisionConfig(**spec["vision"], image_size=spec["image_size"], patch_size=14)
    text = tf.Qwen2Config(
        vocab_size=VOCAB, max_position_embeddings=32768, use_sliding_window=False, **spec["text"]
    )
    config = tf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCAB - 2,
        video_token_index=VOCAB - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = "sdpa"
    model: Any = tf.LlavaOnevisionForConditionalGeneration(config)
    return model.to(device=device, dtype=dtype).eval(), byte_tokenizer()


def live_frames(seconds: int, size: int) -> Iterator[tuple[float, np.ndarray]]:
    """A synthetic camera at 1 frame/s: coloured squares moving over a dark background."""
    for second in range(seconds):
        image = np.full((size, size, 3), 20, np.uint8)
        x, y = (second * 7) % (size - 24), (second * 11) % (size - 24)
        image[y : y + 24, x : x + 24] = (40 + second % 200, 200, 90)
        image[size - y - 24 : size - y, x : x + 12] = (30, 60, 220)
        yield float(second), image


def vlm_part(args: argparse.Namespace, save: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """memlayer's row, saved at once (a run cut short keeps it), then dense attention's."""
    model, tokenizer = random_vlm(args.shape, args.device, args.family)
    size = shape_spec(args.family, args.shape)["image_size"]
    seconds = args.minutes * 60
    frame_size = size if args.family == "qwen2-vl" else None
    frames = image_frames(model, size=frame_size)
    assert frames is not None
    tokens = frames.tokens
    session = VideoSession(
        model,
        tokenizer,
        system="You are watching a camera.",
        chat=False,
        progress=False,
        fps=1.0,
        chunk_frames=args.chunk_frames,
        n_local=args.local_frames * tokens,
        retrieve=args.retrieve,
        gpu_budget=args.gpu_budget if args.device == "cuda" else None,
        ram_budget=args.ram_budget,
        frame_size=frame_size,
    )
    timeline: list[dict[str, Any]] = []
    started = time.perf_counter()
    mark = 0
    for frames in session.stream(live_frames(seconds, size)):
        if frames >= mark or frames == seconds:
            stats = session.stats()
            timeline.append(
                {
                    "minute": frames / 60,
                    "elapsed_s": time.perf_counter() - started,
                    "rss_mb": rss_mb(),
                    "gpu_mb": gpu_mb(),
                    "tiers_mb": {n: t["bytes"] / 2**20 for n, t in stats["tiers"].items()},
                    "resident_mb": stats["resident_bytes"] / 2**20,
                }
            )
            mark += 60 * args.every_minutes
    encode_s = session.stats()["encode_s"]
    answers = [session.ask(QUESTION, max_new_tokens=4, retrieve=args.retrieve) for _ in range(3)]
    memlayer = {
        "method": "memlayer (ReKV)",
        "frames": len(session.timestamps),
        "frame_tokens": tokens,
        "tokens": len(session.timestamps) * tokens,
        "encode_frames_per_s": len(session.timestamps) / encode_s,
        "first_token_s": statistics.median(a.first_token_s for a in answers),
        "timeline": timeline,
    }
    shape = {"family": args.family, "shape": args.shape}
    save({**shape, "rows": [memlayer], "dense": "not finished"})
    dense = dense_baseline(model, tokenizer, session, seconds, size, args)
    return {**shape, "rows": [memlayer, dense]}


def dense_baseline(
    model: Any, tokenizer: Any, session: VideoSession, seconds: int, size: int, args: Any
) -> dict[str, Any]:
    """The same frames through the model's own attention with a dense KV cache of everything,
    chunk by chunk at true positions (1-D for Qwen2-VL too: the cost is the same); the
    question attends to the whole video."""
    from transformers import DynamicCache

    from memlayer.video_input import sample

    cache = DynamicCache(config=model.config.get_text_config())
    embed = model.get_input_embeddings()
    position = 0
    timeline: list[dict[str, Any]] = []
    started = time.perf_counter()
    encode_s = 0.0
    frames = 0
    mark = 0
    oom = None

    def forward(embeds: torch.Tensor) -> torch.Tensor:
        nonlocal position
        positions = torch.arange(position, position + embeds.shape[0], device=embeds.device)
        out = model(
            inputs_embeds=embeds[None],
            position_ids=positions[None],
            **{cache_argument(model): cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits[0, -1]
        position += embeds.shape[0]
        return out

    prefix = session._prefix_ids
    images = session._images
    if images is None:
        raise ValueError("the dense baseline needs a session on a vision-language model")
    with torch.no_grad():
        forward(embed(torch.tensor(prefix, device=embed.weight.device)))
        batch: list[np.ndarray] = []
        for _, image in sample(live_frames(seconds, size), 1.0):
            batch.append(image)
            if len(batch) < args.chunk_frames and frames + len(batch) < seconds:
                continue
            tick = time.perf_counter()
            try:
                forward(images.embed(batch).flatten(0, 1))
            except torch.OutOfMemoryError as exc:
                oom = f"out of memory at minute {frames / 60:.1f}: {exc}"[:200]
                break
            encode_s += time.perf_counter() - tick
            frames += len(batch)
            batch = []
            if frames >= mark or frames == seconds:
                layers: list[Any] = list(cache.layers)
                kv = sum(
                    t.numel() * t.element_size()
                    for layer in layers
                    for t in (layer.keys, layer.values)
                    if t is not None
                )
                timeline.append(
                    {
                        "minute": frames / 60,
                        "elapsed_s": time.perf_counter() - started,
                        "rss_mb": rss_mb(),
                        "gpu_mb": gpu_mb(),
                        "kv_cache_mb": kv / 2**20,
                    }
                )
                mark += 60 * args.every_minutes
        firsts = []
        if oom is None:
            question = session._encode("\n" + QUESTION)
            for _ in range(3):
                tick = time.perf_counter()
                forward(embed(torch.tensor(question, device=embed.weight.device)))
                firsts.append(time.perf_counter() - tick)
                cache.crop(-len(question))
                position -= len(question)
    return {
        "method": "dense attention",
        "frames": frames,
        "tokens": position,
        "encode_frames_per_s": frames / encode_s if encode_s else None,
        "first_token_s": statistics.median(firsts) if firsts else None,
        "timeline": timeline,
        "out_of_memory": oom,
    }


# How a text frame is written (the session's text_format), how a planted event's frame text
# is written, how its question ends (the cue the answer continues) and what the answer is
# checked for. "code" and "what" ask the question, about the event at a known time
# (the time is in the question; checked: the event's code or its key words in the answer);
# "paren", "at", "line" ask when an event happened (the time is not in the question;
# checked: the answer starts with the event's timestamp). Routine lines are written exactly
# like event lines but for the "code" format's event frames.
@dataclass(frozen=True)
class Format:
    line: str
    event: str
    cue: str
    asks: Literal["code", "key", "time"]


FORMATS: dict[str, Format] = {
    "code": Format(
        "[{time}] {text}", "The code at {time} is {code}.", "The code at {time} is", "code"
    ),
    "what": Format("[{time}] {text}", "{text}", "[{time}]", "key"),
    "paren": Format(
        "{text} (at {time}).", "{text}", "Question: {question}\nAnswer: {said} (at", "time"
    ),
    "at": Format("{text} at {time}.", "{text}", "Question: {question}\nAnswer: {said} at", "time"),
    "line": Format("{text} (at {time}).", "{text}", "{line} (at", "time"),
}
SYSTEM = "Security camera log."


def planted(fmt: str, log: list[tuple[float, str]], events: list[Event]) -> list[tuple[float, str]]:
    """The log with each event's frame written as format `fmt` writes event frames."""
    out = list(log)
    for event in events:
        text = FORMATS[fmt].event.format(
            text=event.text, time=clock(event.timestamp), code=event.code
        )
        out[event.frame] = (event.timestamp, text)
    return out


def cue(fmt: str, event: Event) -> str:
    """The question and answer cue of `event` in format `fmt`."""
    said = event.text.split(": ", 1)[1]
    return FORMATS[fmt].cue.format(
        question=event.question, said=said, line=event.text, time=clock(event.timestamp)
    )


def answered(fmt: str, event: Event, answer: str) -> bool:
    """Whether `answer` answers `event`'s question in format `fmt`: it holds the event's code
    ("code") or key words ("key", any case), or it starts with the event's time ("time")."""
    asks = FORMATS[fmt].asks
    if asks == "code":
        return event.code in answer
    if asks == "key":
        return event.key.lower() in answer.lower()
    return answer.strip().startswith(clock(event.timestamp))


def dense_text(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    """The same questions answered with dense attention over short logs (`--dense-frames`
    frames each, written and padded exactly as the session writes frames), one log per seed
    with 5 events, until `--dense-questions` are asked; greedy, `--answer-tokens` tokens."""
    from transformers import DynamicCache

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    newline = ids("\n")[0]
    rows: list[dict[str, Any]] = []
    seed = args.seed
    while len(rows) < args.dense_questions:
        log, events = event_log(args.dense_frames, 5, seed=seed)
        seed += 1
        stream = ids(SYSTEM + "\n")
        for time_s, text in planted(args.format, log, events):
            line = ids(FORMATS[args.format].line.format(time=clock(time_s), text=text))
            stream += line + [newline] * (32 - len(line))
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=torch.tensor([stream]), past_key_values=cache, use_cache=True)
            for event in events[: args.dense_questions - len(rows)]:
                step = ids("\n" + cue(args.format, event))
                out: list[int] = []
                for _ in range(args.answer_tokens):
                    logits = model(
                        input_ids=torch.tensor([step]), past_key_values=cache, use_cache=True
                    ).logits[0, -1]
                    out.append(int(logits.argmax()))
                    step = out[-1:]
                cache.crop(len(stream) - cache.get_seq_length())
                text = tokenizer.decode(out, skip_special_tokens=True).strip()
                rows.append(
                    {
                        "timestamp": clock(event.timestamp),
                        "answer": text,
                        "correct": answered(args.format, event, text),
                    }
                )
    correct = sum(r["correct"] for r in rows)
    return {
        "method": "dense attention (SmolLM2's own, everything in context)",
        "frames": args.dense_frames,
        "tokens": len(stream),
        "events": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows),
        "rows": rows,
    }


def text_part(args: argparse.Namespace) -> dict[str, Any]:
    log, events = event_log(args.frames, args.events, seed=args.seed)
    session = VideoSession(
        system=SYSTEM,
        text_format=FORMATS[args.format].line,
        chat=False,
        progress=False,
        fps=None,
        frame_tokens=32,
        chunk_frames=8,
        n_local=args.local_frames * 32,
        retrieve=args.retrieve,
        sink_frames=args.sink_frames,
        retriever=TextFrameRetriever(terms=args.terms) if args.by == "retriever" else None,
    )
    dense = dense_text(args, session.model, session.tokenizer) if args.dense_frames else None
    started = time.perf_counter()
    for frames in session.stream(planted(args.format, log, events)):
        if frames % 200 == 0:
            print(f"encoded {frames} frames in {time.perf_counter() - started:.0f} s", flush=True)
    encode_s = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    for event in events:
        answer = session.ask(
            cue(args.format, event),
            max_new_tokens=args.answer_tokens,
            retrieve=args.retrieve,
            by=args.by,
        )
        most = max(f.layers for f in answer.frames)
        row = {
            "frame": event.frame,
            "timestamp": clock(event.timestamp),
            "expected": {"code": event.code, "key": event.key, "time": clock(event.timestamp)}[
                FORMATS[args.format].asks
            ],
            "answer": answer.text,
            "correct": answered(args.format, event, answer.text),
            "retrieved": any(f.index == event.frame for f in answer.frames),
            "most_layers": any(f.index == event.frame and f.layers == most for f in answer.frames),
            "layers": next((f.layers for f in answer.frames if f.index == event.frame), 0),
            "top_cited": answer.citations[0] == event.timestamp,
            "cited": [clock(t) for t in answer.citations[:3]],
            "first_token_s": answer.first_token_s,
        }
        rows.append(row)
        print(
            f"{row['timestamp']} {row['expected']!r} -> {answer.text!r} {row['cited']}", flush=True
        )

    def count(*keys: str) -> int:
        return sum(all(r[k] for k in keys) for r in rows)

    return {
        "format": args.format,
        "line": FORMATS[args.format].line,
        "event_line": FORMATS[args.format].event,
        "cue": FORMATS[args.format].cue,
        "asks": FORMATS[args.format].asks,
        "answer_tokens": args.answer_tokens,
        "sink_frames": session.sink_frames,
        "local_frames": args.local_frames,
        "by": args.by,
        "retriever": session.retriever.name if session.retriever is not None else None,
        "dense": dense,
        "frames": args.frames,
        "tokens": args.frames * 32,
        "events": len(rows),
        "retrieve": args.retrieve,
        "correct": count("correct"),
        "accuracy": count("correct") / len(rows),
        "retrieved": count("retrieved"),
        "most_layers": count("most_layers"),
        "top_cited": count("top_cited"),
        "correct_and_top_cited": count("correct", "top_cited"),
        "correct_and_retrieved": count("correct", "retrieved"),
        "encode_frames_per_s": args.frames / encode_s,
        "first_token_s": statistics.median(r["first_token_s"] for r in rows),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["vlm", "text"], required=True)
    parser.add_argument("--family", choices=["llava", "qwen2-vl"], default="llava")
    parser.add_argument("--shape", choices=sorted({*SHAPES, *QWEN_SHAPES}), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--every-minutes", type=int, default=10)
    parser.add_argument("--chunk-frames", type=int, default=8)
    parser.add_argument("--local-frames", type=int, default=16)
    parser.add_argument("--retrieve", type=int, default=16)
    parser.add_argument(
        "--by",
        choices=["model", "retriever"],
        default="model",
        help="text part: frames chosen by the model's queries or by a TextFrameRetriever",
    )
    parser.add_argument(
        "--terms", type=float, default=0.5, help="the text retriever's keyword-term weight"
    )
    parser.add_argument("--ram-budget", default="16MiB")
    parser.add_argument("--gpu-budget", default="2GiB")
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--events", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=list(FORMATS), default="code")
    parser.add_argument("--answer-tokens", type=int, default=12)
    parser.add_argument("--sink-frames", type=int, default=4)
    parser.add_argument("--dense-frames", type=int, default=60, help="0: no dense baseline")
    parser.add_argument("--dense-questions", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    stamp = datetime.date.today().isoformat()
    family = f"_{args.family}" if args.part == "vlm" and args.family != "llava" else ""
    path = args.json or RESULTS / f"video_stream_{args.part}{family}_{stamp}.json"

    def save(result: dict[str, Any]) -> dict[str, Any]:
        out = {
            "benchmark": f"video_stream/{args.part}",
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "cpus": torch.get_num_threads(),
                "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            },
            **result,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        return out

    result = vlm_part(args, save) if args.part == "vlm" else text_part(args)
    out = save(result)
    print(json.dumps({k: v for k, v in out.items() if k not in ("rows", "dense")}, indent=1)[:4000])
    if args.part == "text":
        print(
            f"memlayer: answered {result['correct']}/{result['events']}, event frame cited first "
            f"{result['top_cited']}/{result['events']}, both {result['correct_and_top_cited']}"
        )
        if result["dense"]:
            dense = result["dense"]
            print(f"dense ({dense['frames']} frames): {dense['correct']}/{dense['events']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
