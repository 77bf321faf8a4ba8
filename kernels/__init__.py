"""memlayer.kernels: page scoring and paged sparse attention behind one set of functions.

The torch reference (`reference.py`) runs on every device; on CUDA tensors the attention
kernels (window, paged, a layer's whole step) and score_pages run Triton (`triton_paged.py`,
via `dispatch.py`) behind the same names, unless MEMLAYER_KERNELS=reference; on the CPU a
decode step's attention and its page selection (InfLLM's and ReKV's shared one, Quest's
per KV head) run compiled C (`cpu_decode.py`), a resident layer's whole step in one call
(`decode_layer`) and the token's window write in another (`window_put`); a prefill chunk's
attention can take its products in bfloat16 where the CPU has AVX512-BF16 (`cpu_bf16.py`).
merge_attention, score_pages_summed and select_pages are a few torch operations that run on
the tensors' own device. Imports only torch; triton loads on first CUDA use.
"""

from memlayer.kernels.cpu_bf16 import available as bf16_products_available
from memlayer.kernels.dispatch import (
    causal_window_attention,
    decode_layer,
    paged_attention,
    score_pages,
    select_pages_bounds,
    select_pages_summed,
    sparse_attention,
    takes_bf16_products,
    window_put,
)
from memlayer.kernels.reference import merge_attention, score_pages_summed, select_pages

__all__ = [
    "bf16_products_available",
    "causal_window_attention",
    "decode_layer",
    "merge_attention",
    "paged_attention",
    "score_pages",
    "score_pages_summed",
    "select_pages",
    "select_pages_bounds",
    "select_pages_summed",
    "sparse_attention",
    "takes_bf16_products",
    "window_put",
]
