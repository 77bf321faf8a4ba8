"""memlayer.kernels: page scoring and paged sparse attention behind one set of functions.

The torch reference (`reference.py`) runs on every device; CUDA kernels in Triton slot in
behind these same names (issue 5) so callers never change. Imports only torch.
"""

from memlayer.kernels.reference import (
    causal_window_attention,
    merge_attention,
    paged_attention,
    score_pages,
    select_pages,
)

__all__ = [
    "causal_window_attention",
    "merge_attention",
    "paged_attention",
    "score_pages",
    "select_pages",
]
