"""memlayer.kernels: page scoring and paged sparse attention behind one set of functions.

The torch reference (`reference.py`) runs on every device; on CUDA tensors paged_attention
and score_pages run Triton kernels (`triton_paged.py`, via `dispatch.py`) behind the same
names, unless MEMLAYER_KERNELS=reference. Imports only torch; triton loads on first CUDA use.
"""

from memlayer.kernels.dispatch import paged_attention, score_pages
from memlayer.kernels.reference import causal_window_attention, merge_attention, select_pages

__all__ = [
    "causal_window_attention",
    "merge_attention",
    "paged_attention",
    "score_pages",
    "select_pages",
]
