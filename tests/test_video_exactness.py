"""A video session's answer equals full-context attention when every frame is retrieved.

The reference is the dense model itself (its own rotary at true positions, its own layers)
with an independent attention function: eager softmax under the mask that ReKV's encoding
defines — while frames stream, a token sees the system prompt (sinks) and the local window
(the last `n_local` tokens before its chunk, whole frames kept; its chunk causally); the
question sees everything before it. With `retrieve` covering every frame, the session's
answer context (sinks, every frame in time order, the window, the question, at consecutive
positions) is exactly that, so the logits must agree to float32 rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from video_models import byte_tokenizer, tiny_llava, tiny_qwen_vl, write_video

from memlayer import VideoSession
from memlayer.kvretrieval.frames import FrameContextCache
from memlayer.kvretrieval.model import routed_forward
from memlayer.video_input import read_video

# 10 frames streamed at 2 fps in chunks of 3, a window of 2 frames, exact positions
STREAM: dict[str, Any] = dict(
    system="Watch the shapes.",
    progress=False,
    fps=2,
    chunk_frames=3,
    n_local=8,
    positions="exact",
    page_dtype="model",  # float32 pages: attention equal to the reference's
)
MASK: list[torch.Tensor] = []  # the reference attention's mask for the current forward


def masked_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Eager attention of the whole sequence under MASK[0] [T, T] (GQA by repetition)."""
    group = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(group, dim=1)
    values = value.repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = (query @ keys.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~MASK[0], float("-inf"))
    out = torch.softmax(logits.float(), dim=-1).to(query.dtype) @ values
    return out.transpose(1, 2).contiguous(), None


def rekv_mask(n_init: int, frame: int, n_local: int, chunks: list[int], total: int) -> torch.Tensor:
    """Who sees whom: chunk rows see the sinks and their window, the rest see everything."""
    rows = torch.arange(total).unsqueeze(1)
    cols = torch.arange(total).unsqueeze(0)
    visible = cols <= rows
    start = 0
    for end in chunks:
        past = start - n_local - n_init  # tokens before the window, after the sinks
        window = n_init + (past // frame) * frame if past >= 0 else 0
        rows_c = slice(start, end)
        visible[rows_c] &= (cols < n_init) | (cols >= window)
        start = end
    return visible


def answer_with_every_frame(
    session: VideoSession, question: list[int]
) -> tuple[torch.Tensor, list[list[int]]]:
    """The session's logits [T, vocab] for `question` read over every frame (retrieve far
    more than there are), and the frames each layer chose."""
    answer_cache = FrameContextCache(session.cache.memories, retrieve=1000)
    with torch.no_grad():
        logits = routed_forward(
            session.model,
            session._route,
            answer_cache,
            layers=2,
            inputs_embeds=session._embed_ids(question)[None],
            logits_to_keep=0,
        )[0]
    return logits, answer_cache.chosen()


@pytest.mark.parametrize(("selector", "sink_frames"), [("rekv", 0), ("quest", 0), ("rekv", 2)])
def test_all_frames_retrieved_equals_full_context(
    tmp_path: Path, selector: str, sink_frames: int
) -> None:
    from transformers import AttentionInterface

    tokenizer = byte_tokenizer()
    model = tiny_llava()
    reference = tiny_llava()  # the same seed: the same weights, its own config
    video = write_video(tmp_path / "shapes.mp4", seconds=5.0, rate=10, planted=2.0)
    session = VideoSession(model, tokenizer, **STREAM, selector=selector, sink_frames=sink_frames)
    assert session.feed(video) == 10
    n_init, frame = session.kv_config.n_init, session.frame_tokens
    assert n_init == len(session._prefix_ids) + sink_frames * frame
    # the window keeps 2 frames, the sinks `sink_frames`; the rest are pages
    assert session.pages == 10 - 8 // frame - sink_frames

    question = session._encode("\nWhat moved?")
    logits, chosen = answer_with_every_frame(session, question)
    assert chosen == [list(range(10 - 2 - sink_frames))] * 2

    frames = [image for _, image in read_video(video, fps=2, size=56)]
    pixels = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        video_features = reference.model.get_video_features(((pixels - 0.5) / 0.5)[None])
        video_features = video_features.pooler_output[0, : len(frames) * session.frame_tokens]
        embeds = torch.cat(
            [
                session._embed_ids(session._prefix_ids),
                video_features,
                session._embed_ids(question),
            ]
        )
    prefix = len(session._prefix_ids)
    chunk_ends = [prefix + frame * min(n, 10) for n in (3, 6, 9, 10)]
    MASK[:] = [rekv_mask(n_init, frame, 8, chunk_ends, embeds.shape[0])]
    AttentionInterface.register("video_reference", masked_attention)
    reference.set_attn_implementation("video_reference")
    with torch.no_grad():
        expected = reference(
            inputs_embeds=embeds[None], position_ids=torch.arange(embeds.shape[0])[None]
        ).logits[0, -len(question) :]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_frame_embeddings_are_the_models_video_features(tmp_path: Path) -> None:
    model = tiny_llava()
    session = VideoSession(model, byte_tokenizer(), progress=False)
    video = write_video(tmp_path / "shapes.mp4", seconds=2.0, rate=5)
    frames = [image for _, image in read_video(video, fps=None, size=56)]
    pixels = (torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = model.model.get_video_features(pixels[None])
    got = session._images.embed(frames)
    assert got.shape == (len(frames), session.frame_tokens, 64)
    # the video's one newline embedding (appended here by newer transformers) is not a frame's
    expected = expected.pooler_output[0, : got.shape[0] * got.shape[1]]
    torch.testing.assert_close(got.flatten(0, 1), expected)


def grid_positions(prefix: int, frames: int, tokens: int, columns: int, tail: int) -> torch.Tensor:
    """Multimodal positions [3, 1, T] of prefix text, `frames` image frames and `tail` text:
    each token has a 1-D position of its own; an image token t of a frame starting at p sits
    at (p, p + row, p + column) of its frame's grid, text tokens at (i, i, i)."""
    total = prefix + frames * tokens + tail
    positions = torch.arange(total).repeat(3, 1)
    for frame in range(frames):
        start = prefix + frame * tokens
        t = torch.arange(tokens)
        positions[0, start : start + tokens] = start
        positions[1, start : start + tokens] = start + t // columns
        positions[2, start : start + tokens] = start + t % columns
    return positions[:, None]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_all_frames_retrieved_equals_full_context(tmp_path: Path, family: str) -> None:
    """Qwen2-VL / Qwen2.5-VL: the same equality, with the reference's own multimodal RoPE at
    each frame's grid positions (memlayer turns image tokens there from its 1-D placement)."""
    from transformers import AttentionInterface

    model, reference = tiny_qwen_vl(family), tiny_qwen_vl(family)
    video = write_video(tmp_path / "shapes.mp4", seconds=5.0, rate=10, planted=2.0)
    session = VideoSession(model, byte_tokenizer(), **STREAM, frame_size=56, sink_frames=1)
    assert session.feed(video) == 10
    frame = session.frame_tokens
    assert frame == 4
    question = session._encode("\nWhat moved?")
    logits, _ = answer_with_every_frame(session, question)
    frames = [image for _, image in read_video(video, fps=2, size=56)]
    with torch.no_grad():
        pixels, grid = session._images.patches(frames)
        features = reference.model.get_image_features(pixels, grid).pooler_output
        prefix = session._embed_ids(session._prefix_ids)
        embeds = torch.cat([prefix, *features, session._embed_ids(question)])
    n_prefix = len(session._prefix_ids)
    chunk_ends = [n_prefix + frame * min(n, 10) for n in (3, 6, 9, 10)]
    MASK[:] = [rekv_mask(session.kv_config.n_init, frame, 8, chunk_ends, embeds.shape[0])]
    AttentionInterface.register("video_reference", masked_attention)
    reference.set_attn_implementation("video_reference")
    positions = grid_positions(n_prefix, 10, frame, 2, len(question))
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds[None], position_ids=positions).logits
    torch.testing.assert_close(logits, expected[0, -len(question) :], rtol=1e-5, atol=1e-5)


def test_qwen_vl_frames_are_the_model_processors_patches() -> None:
    """A frame reaches Qwen2-VL's vision side as its own image processor would give it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    session = VideoSession(
        tiny_qwen_vl(), byte_tokenizer(), progress=False, frame_size=56, page_dtype="model"
    )
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(3)]
    pixels, grid = session._images.patches(frames)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    expected = processor(images=frames, return_tensors="pt")
    torch.testing.assert_close(grid, expected["image_grid_thw"])
    torch.testing.assert_close(pixels, expected["pixel_values"])
    got = session._images.embed(frames)
    with torch.no_grad():
        features = session.model.model.get_image_features(pixels, grid).pooler_output
    torch.testing.assert_close(got, torch.stack(list(features)))
