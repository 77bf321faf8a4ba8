"""Streaming video QA with `VideoSession` on a video this script generates (offline).

Writes a 2-minute MPEG-4 with PyAV (coloured squares moving; at 1:10 a white frame with a red
bar), streams it at 1 frame/s into a LLaVA-OneVision model's paged KV memory, asks while the
stream goes on and at the end, then saves the session and answers again from the saved copy.

    python examples/video_qa.py                     # a tiny random LLaVA-OneVision
    python examples/video_qa.py --model ./llava-onevision-qwen2-0.5b-ov-hf
    python examples/video_qa.py --model ./Qwen2-VL-2B-Instruct   # or Qwen2.5-VL

No vision-language weights ship with memlayer, so without --model the model has random
weights: its answer text is noise, but every step (decoding, frames to pages, retrieval,
citations, save and reload) is the path a real checkpoint takes. With a real checkpoint the
answers describe the video.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from memlayer import VideoSession


def write_video(path: Path, seconds: int = 120, rate: int = 10, size: int = 128) -> Path:
    """Moving squares on a dark background; at 70 s one white frame with a red bar."""
    import av

    container = av.open(str(path), mode="w")
    stream = container.add_stream("mpeg4", rate=rate)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for index in range(seconds * rate):
        image = np.full((size, size, 3), 20, np.uint8)
        if index == 70 * rate:
            image[:] = 255
            image[size // 3 : size // 2] = (255, 0, 0)
        else:
            x, y = (index * 3) % (size - 24), (index * 5) % (size - 24)
            image[y : y + 24, x : x + 24] = (60 + index % 180, 200, 90)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def tiny_random_llava() -> tuple[Any, Any]:
    """A random-weight LLaVA-OneVision (SigLIP + Qwen2, 16 tokens a frame) and a byte-level
    tokenizer, built in code: the stand-in when no checkpoint is at hand."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core)
    torch.manual_seed(0)
    config = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            image_size=392, patch_size=14,
        ),
        text_config=tf.Qwen2Config(
            vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False,
        ),
        image_token_index=298, video_token_index=299, vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )  # fmt: skip
    return tf.LlavaOnevisionForConditionalGeneration(config).eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        help="a local LLaVA-OneVision, Qwen2-VL or Qwen2.5-VL folder (default: tiny random)",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="memlayer-video-"))
    video = write_video(folder / "squares.mp4")
    # window: the last 16 frames (196 tokens a frame for LLaVA-OneVision-0.5B and for Qwen2-VL
    # at its default frame_size of 392 px; the tiny model: 16)
    options: dict[str, Any] = dict(fps=1.0, chunk_frames=8, n_local=16 * 196, retrieve=8)
    if args.model:
        session = VideoSession.from_pretrained(args.model, **options)
    else:
        session = VideoSession(*tiny_random_llava(), progress=False, **options)

    for frames in session.stream(video):  # one chunk of 8 frames at a time
        if frames == 64:  # the stream is still going: ask now
            early = session.ask("What is moving?", max_new_tokens=12)
            print(f"after {frames} frames: {early}")
    answer = session.ask("When does the screen turn white?", max_new_tokens=12, retrieve=8)
    print(f"at the end: {answer}")  # the text, then the timestamps it cites
    print("frames read:", [(f.index, f.timestamp, f.layers) for f in answer.frames])
    print(f"first answer token after {answer.first_token_s * 1000:.0f} ms")
    stats = session.stats()
    print(f"{stats['frames']} frames, {stats['pages']} pages, {stats['frames_per_s']:.1f} frames/s")

    session.save(folder / "session")  # another process could load and answer from it
    again = VideoSession.load(folder / "session", session.model, session.tokenizer)
    print("reloaded:", again.ask("When does the screen turn white?", max_new_tokens=12))


if __name__ == "__main__":
    main()
