"""Tiny random models of real transformers classes for the video tests, and a synthetic video.

No weights of a vision-language model can be installed here, so the tests build LLaVA-OneVision
(SigLIP vision tower, Qwen2 language side), Qwen2-VL, Qwen2.5-VL (multimodal RoPE) and CLIP
from tiny random configs; the code path is the one a real checkpoint takes. The tokenizer is
byte-level (one token per byte), built in code, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB = 300  # 256 bytes, the specials, the image/video tokens


def byte_tokenizer() -> Any:
    """A byte-level fast tokenizer: one token per byte (ids 0..255), <eos> is 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = byte_level
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def tiny_text_lm(seed: int = 0) -> Any:
    """A tiny random Qwen2 causal LM (the language side of `tiny_llava`), for text frames."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.Qwen2Config(**TEXT, use_sliding_window=False)
    config._attn_implementation = "sdpa"
    return tf.Qwen2ForCausalLM(config).eval()


TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)


def tiny_llava(seed: int = 0, image_size: int = 56) -> Any:
    """A tiny random LLaVA-OneVision (float32, eval): 56-px frames -> 4x4 patches -> 2x2 = 4
    tokens per frame after the model's own pooling; Qwen2 language side with GQA."""
    import transformers as tf

    torch.manual_seed(seed)
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
    )
    text = tf.Qwen2Config(**TEXT, use_sliding_window=False)
    config = tf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCAB - 2,
        video_token_index=VOCAB - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = "sdpa"
    return tf.LlavaOnevisionForConditionalGeneration(config).eval()


def tiny_qwen_vl(family: str = "qwen2_vl", seed: int = 0) -> Any:
    """A tiny random Qwen2-VL or Qwen2.5-VL (float32, eval): 14-px patches merged 2 x 2, so a
    56-px frame is 2 x 2 = 4 tokens; multimodal RoPE sections (time, row, column) of 2, 3, 3
    of the 8 rotary frequencies; the language side `TEXT`, as LLaVA-OneVision's."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(
        TEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=256,
    )
    text.pop("head_dim")  # the Qwen-VL text configs derive it: 64 / 4 = 16
    vision: dict[str, Any] = dict(
        depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2
    )
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        config: Any = tf.Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=VOCAB - 2,
            video_token_id=VOCAB - 1,
        )
        model: Any = tf.Qwen2VLForConditionalGeneration(config)
    else:
        vision.update(hidden_size=32, intermediate_size=48, out_hidden_size=64, window_size=28)
        config = tf.Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=VOCAB - 2,
            video_token_id=VOCAB - 1,
        )
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
    config._attn_implementation = "sdpa"
    return model.eval()


def tiny_vlm(family: str) -> Any:
    """`tiny_llava()` for "llava", else `tiny_qwen_vl(family)` (56-px frames: 4 tokens each)."""
    return tiny_llava() if family == "llava" else tiny_qwen_vl(family)


def tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random CLIP (and the byte tokenizer) to `folder`; returns it."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.CLIPConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "eos_token_id": 256,
            "pad_token_id": 256,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    tf.CLIPModel(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def write_video(
    path: Path,
    *,
    seconds: float = 6.0,
    rate: int = 10,
    size: int = 64,
    planted: float | None = None,
) -> Path:
    """An MPEG-4 video written with PyAV: coloured squares moving across a dark background,
    `rate` frames a second; at `planted` seconds one frame is a white screen with a red bar
    (distinct from every other frame)."""
    import av

    container = av.open(str(path), mode="w")
    stream = container.add_stream("mpeg4", rate=rate)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    total = round(seconds * rate)
    for index in range(total):
        image = np.full((size, size, 3), 20, np.uint8)
        if planted is not None and index == round(planted * rate):
            image[:] = 255
            image[size // 3 : size // 2] = (255, 0, 0)
        else:
            x = (index * 3) % (size - 16)
            y = (index * 5) % (size - 16)
            image[y : y + 16, x : x + 16] = (40 + index * 7 % 200, 200, 90)
            image[size - y - 16 : size - y, x : x + 8] = (30, 60, 220)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path
