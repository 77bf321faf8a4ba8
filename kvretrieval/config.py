"""KV memory settings: validated once at the boundary, plain values inside."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from memlayer.config import ByteSize
from memlayer.errors import InvalidInputError

PositionMode = Literal["infllm", "exact"]
PageDtype = Literal["auto", "model", "bfloat16"]
AttentionDtype = Literal["model", "bfloat16"]
Config = TypeVar("Config", bound=BaseModel)


class KVConfig(BaseModel):
    """How a KV session pages, selects and positions its memory, and where pages are kept.

    Page payloads live in a PageStore: a front tier on the model's device (GPU on CUDA,
    else RAM) bounded by `gpu_budget` / `ram_budget` (None: unbounded), and pages pushed out
    go to segment files under `offload_path` (a temporary folder when not given). With a
    bounded front tier, `prefetch` starts bringing up, for the next layer, the pages this
    layer selected, while this layer computes (layers tend to pick the same spans).

    Defaults follow InfLLM's published settings (128 sink tokens, 4K local window, 128-token
    blocks, 4 representative keys) scaled to a small model on a CPU: the attention span
    init + topk·block + local stays at 2K tokens.

    `page_dtype` is the dtype sealed pages are kept in: `"auto"` (the default) keeps them in
    bfloat16 under a float32 model and in the model's dtype otherwise; `"bfloat16"` always;
    `"model"` in the model's dtype (float32 pages: attention over them equal to dense's).
    Bfloat16 pages under a float32 model halve the bytes a step reads and the pages' memory
    (keys and values rounded to 8 bits of mantissa; sinks, window and summaries stay in the
    model's dtype, and attention still computes in float32), with passkey recall unchanged
    (43/43 per selector on the full plan).

    `attention_dtype="bfloat16"` (the default) makes a CPU prefill chunk's attention take its
    products in bfloat16 with float32 accumulation (queries, keys, values and probabilities
    rounded to bfloat16; logits, softmax and output float32), about twice as fast, where the
    CPU has AVX512-BF16 (`memlayer.kernels.bf16_products_available()`): the numerics of a
    bfloat16 flash attention on a GPU, with passkey recall unchanged (43/43). On a CPU with
    AMX the products run in its tiles, through PyTorch's flash attention on bfloat16 copies
    (each part's output rounded to bfloat16 as well, then merged in float32). Elsewhere, for
    decode steps, and with `"model"` (float32 attention equal to dense's), attention stays
    in the model's dtype.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: str = "infllm"  # the name of the session's selector (`PageSelector.name`)
    n_init: int = Field(64, ge=0)
    n_local: int = 512
    block_size: int = 64
    topk: int = 16
    chunk_size: int = 512
    positions: PositionMode = "infllm"
    gpu_budget: ByteSize | None = None
    ram_budget: ByteSize | None = None
    offload_path: Path | None = None
    prefetch: bool = True  # with a bounded front tier: each layer's picks go up for the next
    page_dtype: PageDtype = "auto"
    attention_dtype: AttentionDtype = "bfloat16"

    @field_validator("n_local", "block_size", "topk", "chunk_size")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be a positive integer")
        return value

    @property
    def span(self) -> int:
        """Tokens one query attends to at most (besides the chunk itself)."""
        return self.n_init + self.topk * self.block_size + self.n_local + self.block_size

    def page_dtype_for(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype sealed pages are kept in under a model of `model_dtype`."""
        if self.page_dtype == "auto":
            return torch.bfloat16 if model_dtype == torch.float32 else model_dtype
        return model_dtype if self.page_dtype == "model" else getattr(torch, self.page_dtype)

    @classmethod
    def build(cls, **values: object) -> KVConfig:
        """Validate `values` (InvalidInputError naming the field)."""
        return _validated(cls, values)


class VideoConfig(BaseModel):
    """How a video session samples, encodes and answers (ReKV's settings, validated once).

    Frames are sampled at `fps` and encoded `chunk_frames` at a time with sliding-window
    attention over the system prompt (the sink tokens) and the last `n_local` tokens (rounded
    up to whole frames); `encode_topk` pages are retrieved while encoding (0, ReKV's choice:
    the window alone). The system prompt and the first `sink_frames` frames are the sink
    tokens: read by every question, never paged, retrieved or cited (InfLLM keeps 64-128
    sink tokens; the first frames, encoded with little before them, otherwise draw attention
    like sinks and win every question's selection). A question takes `retrieve` frames per
    layer, in runs of `run` contiguous frames. `frame_tokens` is the size of a text frame (a
    VLM's image frames have the size its vision side gives), written as `text_format` says.
    `frame_size` is the side in pixels image frames are resized to for a vision side that
    takes any size (Qwen2-VL, Qwen2.5-VL: a multiple of 28, default 392: 196 tokens a frame).
    `page_dtype` is `KVConfig.page_dtype` (by default bfloat16 pages under a float32 model).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fps: float | None = Field(1.0, gt=0)  # None: keep every frame (an event log)
    chunk_frames: int = Field(8, ge=1)
    n_local: int | None = Field(None, ge=1)  # None: 16 frames
    retrieve: int = Field(16, ge=1)
    run: int = Field(1, ge=1)
    encode_topk: int = Field(0, ge=0)
    sink_frames: int = Field(4, ge=0)
    frame_tokens: int = Field(32, ge=1)
    frame_size: int | None = Field(None, ge=1)
    text_format: str = "[{time}] {text}"  # how a text frame is written: {time} is H:MM:SS
    positions: PositionMode = "infllm"
    gpu_budget: ByteSize | None = None
    ram_budget: ByteSize | None = None
    offload_path: Path | None = None
    page_dtype: PageDtype = "auto"

    @field_validator("text_format")
    @classmethod
    def _formats_text(cls, value: str) -> str:
        try:
            value.format(time="0:00:00", text="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError("may name only {time} and {text}") from exc
        if "{text}" not in value:
            raise ValueError("must contain {text}")
        return value

    @classmethod
    def build(cls, **values: object) -> VideoConfig:
        """Validate `values` (InvalidInputError naming the field)."""
        return _validated(cls, values)


def _validated(cls: type[Config], values: dict[str, object]) -> Config:
    """`cls(**values)`, with pydantic's error turned into InvalidInputError naming the field."""
    try:
        return cls(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "config"
        raise InvalidInputError(field, first["msg"], first.get("input")) from exc
