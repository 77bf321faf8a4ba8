"""Reciprocal rank fusion: merge rankings from different retrievers without calibrating scores."""

from __future__ import annotations

from collections.abc import Sequence


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[tuple[int, float]]], *, k: int = 60
) -> list[tuple[int, float]]:
    """Fuse ranked (id, score) lists: each id scores Σ 1 / (k + rank); best first, ties by id."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (item, _) in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda pair: (-pair[1], pair[0]))
