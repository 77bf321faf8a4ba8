"""Tiny random models of real transformers classes, shared by the KV memory tests."""

from __future__ import annotations

import copy
from typing import Any

import torch

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)

# YaRN scales the rotary cos/sin by about 1.14: catches any placement that drops the scale.
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 1024,
}


# every page selected at its true position, in float32: attention over the whole past, as dense
EXACT = dict(
    n_init=3,
    n_local=8,
    block_size=4,
    topk=1000,
    chunk_size=8,
    positions="exact",
    page_dtype="model",
)


def tiny(family: str, seed: int = 0) -> Any:
    """A tiny random model of `family`, in float32 eval mode (sdpa attention)."""
    import transformers as tf

    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"use_sliding_window": False}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"use_sliding_window": False}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {}),
        "llama-yarn": (tf.LlamaConfig, tf.LlamaForCausalLM, {"rope_parameters": YARN}),
    }
    config_cls, model_cls, extra = configs[family]
    torch.manual_seed(seed)
    config = config_cls(**COMMON, **extra)
    config._attn_implementation = "sdpa"
    return model_cls(config).eval()


def twin(model: Any) -> Any:
    """An independent copy (own config), so attaching memlayer to one leaves the other dense."""
    return copy.deepcopy(model)


def steps_without_host_sync(
    memory: Any, lengths: list[int], dtype: torch.dtype = torch.float32, device: str = "cuda"
) -> list[torch.Tensor]:
    """The outputs of one layer's memory (2 KV heads, 4 query heads, head size 16) appending
    and attending random chunks of `lengths` tokens, run with CUDA's sync checker set to
    fail on any synchronisation with the host."""
    generator = torch.Generator(device).manual_seed(0)
    inputs = [
        [
            torch.randn(*shape, generator=generator, device=device, dtype=dtype)
            for shape in ((2, length, 16), (2, length, 16), (1, 4, length, 16))
        ]
        for length in lengths
    ]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = []
        for keys, values, queries in inputs:
            memory.append(keys, values)
            outputs.append(memory.attend(queries, 0.25))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return outputs
