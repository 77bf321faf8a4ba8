"""Squeezed Attention (Hooper et al., 2024) as the page selector `squeezed`.

Offline, once per fixed context (`PagedKVCache.regroup`): per layer and KV head, k-means
over the normalised keys (FAISS), and the tokens laid out again so that a page holds one
cluster's keys and values: keeping a cluster is gathering its pages (`cluster_index`).
Online, per step and KV head: each cluster's share of the softmax mass is estimated from its
centroid and size, `size · exp(scale · q·centroid)`, normalised over all clusters; the
clusters whose share for some query row reaches a threshold are kept (then at most `topk`
pages, those with the largest part of the estimated attention first: a cluster's share
spread over its pages by the tokens each holds). Exact attention runs over the kept pages,
the sink tokens and the local window, merged in one softmax.

The threshold is `threshold`, or per KV head from sample queries (`calibrate`, run through
`PagedKVCache.calibrating`): the smallest share among the clusters that cover `mass` of a
query's estimated attention, taken at the quantile that lets `coverage` of the sample
queries reach `mass`. Without either, the `topk` pages of the best clusters are kept.

Hierarchical (`hierarchical=True`): a second level of centroids over the first; a step
scores the groups, opens the `groups_kept` best and scores only their clusters, the closed
groups counting in the normaliser by their own estimate. `stats()` counts the first-level
centroids scored.

Before a regroup, and for pages sealed after it, a page is its own cluster (its mean key).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from memlayer.errors import InvalidInputError
from memlayer.kvretrieval.cluster_index import NEG_INF, ClusterIndex, build
from memlayer.kvretrieval.selectors import SELECTORS, PageLayout, PageSelector


def _fraction(field: str, value: object, *, optional: bool = False) -> None:
    """`value` must be a number in (0, 1] (or None when optional)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidInputError(field, "must be a number in (0, 1]", value)
    if not 0 < value <= 1:
        raise InvalidInputError(field, "must be in (0, 1]", value)


def _count(field: str, value: object, minimum: int) -> None:
    """`value` must be an integer of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(field, f"must be an integer of at least {minimum}", value)


@SELECTORS.register("squeezed")
@dataclass
class SqueezedSelector(PageSelector):
    """Squeezed Attention: keep the clusters of keys whose estimated softmax share is high.

    cluster_fraction: clusters per KV head as a fraction of the fixed context's tokens (5%,
    the paper's default); `clusters` gives the count instead. threshold: keep a cluster when
    its estimated share reaches it (None: `topk` pages until calibrated). mass / coverage:
    what `calibrate` aims at. hierarchical: score through a second level of
    `group_fraction` × the clusters, opening `groups_kept` groups per KV head.
    """

    cluster_fraction: float = 0.05
    clusters: int | None = None
    threshold: float | None = None
    mass: float = 0.9
    coverage: float = 0.9
    hierarchical: bool = False
    group_fraction: float = 0.1
    groups_kept: int = 4
    iterations: int = 20
    seed: int = 0
    name: ClassVar[str] = "squeezed"
    pads_selection: ClassVar[bool] = True
    regroups: ClassVar[bool] = True
    calibrates: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _fraction("cluster_fraction", self.cluster_fraction)
        if self.clusters is not None:
            _count("clusters", self.clusters, 1)
        _fraction("threshold", self.threshold, optional=True)
        _fraction("mass", self.mass)
        _fraction("coverage", self.coverage)
        if not isinstance(self.hierarchical, bool):
            raise InvalidInputError("hierarchical", "must be true or false", self.hierarchical)
        _fraction("group_fraction", self.group_fraction)
        _count("groups_kept", self.groups_kept, 1)
        _count("iterations", self.iterations, 1)
        _count("seed", self.seed, 0)
        self._index: ClusterIndex | None = None
        self._thresholds: torch.Tensor | None = None  # calibrated log thresholds [Hkv]
        self._scored: torch.Tensor | None = None  # first-level centroids scored (device)
        self._possible = 0  # ... out of this many
        self._nonempty = 0  # non-empty first-level clusters of the fixed context
        self._fractions: torch.Tensor | None = None  # `_page_fractions`, grown on demand

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def summary_rows(self) -> int:
        return 1

    @property
    def index(self) -> ClusterIndex | None:
        """The layer's cluster index (None until a page is sealed)."""
        return self._index

    @property
    def thresholds(self) -> torch.Tensor | None:
        """Per KV head share thresholds set by `calibrate` (None: not calibrated)."""
        return None if self._thresholds is None else self._thresholds.exp()

    # -- summaries and the index ----------------------------------------------------------

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """A page's mean key (a regrouped page's summary is its cluster's centroid)."""
        return keys.float().mean(dim=2, keepdim=True).to(keys.dtype)

    def sealed(self, first: int, keys: torch.Tensor, summaries: torch.Tensor) -> None:
        """Pages sealed outside a regroup join the index as one-page clusters."""
        if self._index is None:
            self._index = ClusterIndex.empty(
                keys.shape[1], keys.shape[-1], keys.shape[2], keys.device
            )
        assert first == self._index.page_cluster.shape[0]
        self._index = self._index.add_pages(summaries[:, :, 0], keys.shape[2])

    def truncate(self, count: int) -> None:
        if self._index is not None:
            self._index = self._index.truncate(count)

    def check_layout(self) -> None:
        if self._index is not None and self._index.regrouped:
            raise InvalidInputError(
                "regroup", "the pages are already clustered: regroup once per fixed context"
            )

    def layout(
        self, keys: torch.Tensor, positions: torch.Tensor, page_size: int
    ) -> PageLayout | None:
        """Cluster every KV head's keys and lay the tokens out by cluster (see
        `cluster_index.build`); any calibration made before is dropped."""
        self.check_layout()
        length = keys.shape[1]
        count = self.clusters or max(1, math.ceil(self.cluster_fraction * length))
        self._index, layout = build(
            keys,
            positions,
            clusters=count,
            page_size=page_size,
            groups=self.group_fraction if self.hierarchical else None,
            seed=self.seed,
            iterations=self.iterations,
        )
        self._thresholds = None
        self._fractions = None
        self._count_clusters()
        return layout

    def _count_clusters(self) -> None:
        """Note the non-empty fixed clusters (a step counts what it scores out of them)."""
        index = self._index
        if index is not None:
            fixed = index.log_sizes[: index.fixed_clusters]
            self._nonempty = int((fixed > NEG_INF).sum())

    # -- selection ------------------------------------------------------------------------

    def _best_shares(self, queries: torch.Tensor, scale: float, explore: bool) -> torch.Tensor:
        """Per KV head, each cluster's best log share over the query rows [Hkv, C]."""
        assert self._index is not None
        heads, dim = self._index.centroids.shape[1:]
        rows = queries[0].float().reshape(heads, -1, dim) * scale
        opened = self.groups_kept if explore and self.hierarchical else None
        shares, scored = self._index.log_shares(rows, opened)
        if self._index.regrouped:
            self._scored = scored if self._scored is None else self._scored + scored
            self._possible += self._nonempty
        return shares.amax(dim=1)

    def kept_clusters(
        self, queries: torch.Tensor, *, scale: float, explore: bool = True
    ) -> torch.Tensor:
        """Which clusters a step keeps, [Hkv, C] bool: those at or above the threshold
        (every scored cluster when there is none)."""
        best = self._best_shares(queries, scale, explore)
        return best >= self._log_threshold(best)

    def _log_threshold(self, best: torch.Tensor) -> torch.Tensor:
        """Log share threshold per KV head [Hkv, 1] (-inf: none)."""
        if self._thresholds is not None:
            return self._thresholds[:, None]
        if self.threshold is not None:
            return best.new_full((best.shape[0], 1), math.log(self.threshold))
        return best.new_full((best.shape[0], 1), NEG_INF)

    def _page_scores(self, queries: torch.Tensor, pages: int, scale: float) -> torch.Tensor:
        """[Hkv, P]: each page's share of the estimated attention — its cluster's best log
        share, times the fraction of the cluster's tokens the page holds — or -inf when the
        cluster is not kept (or not scored), or the page holds nothing for the head.

        A page budget is best spent on the pages that carry the most attention each: a
        large cluster of middling keys spread over many pages would otherwise give every one
        of its pages the whole cluster's share and crowd out a small cluster of the keys
        the query matches best (a passkey among repeated filler)."""
        assert self._index is not None
        best = self._best_shares(queries, scale, explore=True)
        best = best.masked_fill(best < self._log_threshold(best), NEG_INF)
        cluster = self._index.page_cluster[:pages].T  # [Hkv, P]
        shares = best.gather(1, cluster.clamp(min=0)) + self._page_fractions(pages)
        return shares.masked_fill(cluster < 0, NEG_INF)

    def _page_fractions(self, pages: int) -> torch.Tensor:
        """Log fraction of its cluster each of the first `pages` pages holds, [Hkv, P]: the
        fixed pages' from the layout, 0 for a page sealed later (a one-page cluster)."""
        cached = self._fractions
        if cached is None or cached.shape[1] < pages:
            assert self._index is not None
            fixed = self._index.page_log_fractions().T  # [Hkv, fixed_pages]
            later = fixed.new_zeros(fixed.shape[0], max(pages, 2 * fixed.shape[1]) - fixed.shape[1])
            self._fractions = cached = torch.cat([fixed, later], dim=1)
        return cached[:, :pages]

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """Scores [1, Hkv, P]: the page's cluster's best estimated log share (1/√D scale)."""
        scale = queries.shape[-1] ** -0.5
        return self._page_scores(queries, summaries.shape[0], scale)[None]

    def select(
        self, queries: torch.Tensor, summaries: torch.Tensor, topk: int, *, scale: float
    ) -> torch.Tensor:
        """The pages of the kept clusters, best first up to `topk`, ascending, -1 padded."""
        scores = self._page_scores(queries, summaries.shape[0], scale)
        take = min(topk, scores.shape[1])
        best, pages = scores.topk(take, dim=-1)
        pages = torch.where(best > NEG_INF, pages, -1)
        chosen = pages.new_full((1, scores.shape[0], topk), -1)
        chosen[0, :, :take] = torch.sort(pages, dim=-1).values
        return chosen

    # -- calibration ----------------------------------------------------------------------

    def calibrate(self, queries: torch.Tensor, *, scale: float) -> None:
        """Per KV head thresholds from sample query rows [Hkv, N, D] (memory frame): for each
        row, the share of the last cluster needed (by share, descending) to reach `mass` of
        its estimated attention; the threshold is the (1 − coverage) quantile of those, so
        `coverage` of the rows keep at least `mass`. Shares are scored flat (exactly)."""
        index = self._index
        if index is None or not index.regrouped:
            raise InvalidInputError("calibrate", "regroup the fixed context first")
        if queries.ndim != 3 or queries.shape[0] != index.centroids.shape[1]:
            raise InvalidInputError(
                "queries", "must be rows [Hkv, N, D] of one layer", tuple(queries.shape)
            )
        rows = queries.float() * scale
        shares, _ = index.log_shares(rows)
        ordered = shares.sort(dim=-1, descending=True).values
        covered = ordered.exp().cumsum(dim=-1)
        last = (covered < self.mass).sum(dim=-1, keepdim=True)
        needed = ordered.gather(-1, last.clamp(max=ordered.shape[-1] - 1))[..., 0]
        self._thresholds = torch.quantile(needed, 1 - self.coverage, dim=1, interpolation="lower")

    # -- persistence and counters ---------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """First-level centroids scored by steps since the regroup, and out of how many."""
        scored = 0.0 if self._scored is None else float(self._scored)
        return {"centroids_scored": scored, "centroids_total": float(self._possible)}

    def state(self) -> dict[str, torch.Tensor]:
        if self._index is None:
            return {}
        state = dict(self._index.state())
        if self._thresholds is not None:
            state["thresholds"] = self._thresholds
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._index = ClusterIndex.from_state(state) if state else None
        self._thresholds = state.get("thresholds")
        self._fractions = None
        self._count_clusters()
