"""One layer's cluster index over a fixed context (Squeezed Attention), and its page layout.

Built once per fixed context: per KV head, FAISS k-means over the L2-normalised keys (so a
cluster gathers keys of one direction), each cluster's centroid the mean of its raw keys, so
`q·centroid` is the mean logit of the cluster and `log size + q·centroid` estimates the log
of its softmax mass. Each head's tokens are then laid out by cluster, a page holding the keys
of one cluster (a large cluster spans several pages; a cluster's last page is partly empty).
A second level of centroids (k-means over the first, weighted by cluster size) groups the
clusters, so a query scores the groups, then only the clusters of the best groups.

Pages sealed after the regroup (a conversation on the fixed context) join the index as
one-page clusters whose centroid is the page's mean key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from memlayer.kvretrieval.selectors import PageLayout
from memlayer.optional import require_faiss

NEG_INF = float("-inf")


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1 (a zero row stays zero)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def kmeans_labels(
    points: torch.Tensor,
    k: int,
    *,
    seed: int,
    iterations: int,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Seeded FAISS k-means of `points` [n, D] into min(k, n) clusters: each point's cluster
    [n] (long, on the points' device). `weights` [n] weigh the points (cluster sizes)."""
    import numpy as np

    faiss = require_faiss()

    x = np.ascontiguousarray(points.detach().float().cpu().numpy())
    count = min(k, x.shape[0])
    kmeans = faiss.Kmeans(
        x.shape[1],
        count,
        niter=iterations,
        seed=seed,
        min_points_per_centroid=1,  # few points per cluster is the point here: no warning
        max_points_per_centroid=max(1, x.shape[0]),  # train on every point, no sampling
        verbose=False,
    )
    w = None if weights is None else np.ascontiguousarray(weights.float().cpu().numpy())
    kmeans.train(x, weights=w)
    _, assigned = kmeans.index.search(x, 1)
    return torch.from_numpy(assigned[:, 0].astype(np.int64)).to(points.device)


@dataclass(frozen=True)
class ClusterIndex:
    """Centroids and membership of one layer's clusters, every KV head at once.

    Cluster c of head h: `centroids[c, h]` (mean raw key), `log_sizes[c, h]` (log of its
    tokens, -inf for an empty one). Page p holds cluster `page_cluster[p, h]` for head h
    (-1: nothing). The first `fixed_clusters` clusters and `fixed_pages` pages are the fixed
    context's; `positions[p, h, s]` is the absolute position of the token in row s of fixed
    page p (-1 for an unused row). Level 2: group g of head h has centroid `groups[g, h]`,
    log size `group_log_sizes[g, h]` and level-1 clusters `members[g, h]` (-1 padding).
    """

    centroids: torch.Tensor  # [C, Hkv, D] float32
    log_sizes: torch.Tensor  # [C, Hkv] float32
    page_cluster: torch.Tensor  # [P, Hkv] long
    positions: torch.Tensor  # [fixed_pages, Hkv, S] long
    groups: torch.Tensor  # [G, Hkv, D] float32
    group_log_sizes: torch.Tensor  # [G, Hkv] float32
    members: torch.Tensor  # [G, Hkv, M] long
    fixed_clusters: int = 0  # level-1 clusters of the fixed context (0 until a regroup)

    @property
    def fixed_pages(self) -> int:
        """Pages of the fixed context (0 until a regroup)."""
        return self.positions.shape[0]

    @classmethod
    def empty(cls, heads: int, dim: int, page_size: int, device: torch.device) -> ClusterIndex:
        """No clusters yet: every sealed page joins as its own (`add_pages`)."""
        floats = torch.empty(0, heads, dim, device=device)
        longs = torch.empty(0, heads, dtype=torch.long, device=device)
        return cls(
            centroids=floats,
            log_sizes=floats[..., 0],
            page_cluster=longs,
            positions=torch.empty(0, heads, page_size, dtype=torch.long, device=device),
            groups=floats,
            group_log_sizes=floats[..., 0],
            members=torch.empty(0, heads, 0, dtype=torch.long, device=device),
        )

    @property
    def regrouped(self) -> bool:
        """The fixed context's pages have been laid out by cluster."""
        return self.fixed_pages > 0

    def add_pages(self, means: torch.Tensor, page_size: int) -> ClusterIndex:
        """The index with N pages [N, Hkv, D] (their mean keys) added as one-page clusters."""
        first = self.centroids.shape[0]
        count, heads = means.shape[:2]
        ids = torch.arange(first, first + count, device=means.device)
        return replace(
            self,
            centroids=torch.cat([self.centroids, means.float()]),
            log_sizes=torch.cat(
                [self.log_sizes, means.new_full((count, heads), math.log(page_size)).float()]
            ),
            page_cluster=torch.cat([self.page_cluster, ids[:, None].expand(count, heads)]),
        )

    def truncate(self, pages: int) -> ClusterIndex:
        """The index without pages from `pages` on (nor their one-page clusters)."""
        if pages >= self.page_cluster.shape[0]:
            return self
        keep = self.centroids.shape[0] - (self.page_cluster.shape[0] - pages)
        return replace(
            self,
            centroids=self.centroids[:keep],
            log_sizes=self.log_sizes[:keep],
            page_cluster=self.page_cluster[:pages],
        )

    def page_log_fractions(self) -> torch.Tensor:
        """Log of the share of its cluster's tokens each fixed page holds, [fixed_pages, Hkv]
        (-inf where a page holds nothing for a head): a cluster spread over several pages
        has its estimated attention spread over them too."""
        held = (self.positions >= 0).sum(dim=-1).float()  # [fixed_pages, Hkv]
        cluster = self.page_cluster[: self.fixed_pages].clamp(min=0)
        sizes = self.log_sizes.gather(0, cluster)
        return held.log() - torch.where(held > 0, sizes, 0)

    def log_shares(
        self, queries: torch.Tensor, explore: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimated log share of each cluster in the softmax of scaled queries [Hkv, R, D]
        over all clusters: [Hkv, R, C], and the fixed clusters scored (a device scalar).

        Flat (`explore` None, or no second level): every cluster scored. Hierarchical: the
        groups are scored, the `explore` best per head (by their best row) are opened and
        only their clusters scored; the groups left closed count in the normaliser by their
        own estimate, and their clusters get -inf.
        """
        heads, rows, _ = queries.shape
        total = self.centroids.shape[0]
        sizes = self.log_sizes.T[:, None, :]  # [Hkv, 1, C]
        if explore is None or self.groups.shape[0] == 0:
            logits = torch.einsum("hrd,chd->hrc", queries, self.centroids) + sizes
            scored = (self.log_sizes[: self.fixed_clusters] > NEG_INF).sum()
            return logits - torch.logsumexp(logits, dim=-1, keepdim=True), scored
        fixed = self.fixed_clusters
        group_logits = torch.einsum("hrd,ghd->hrg", queries, self.groups)
        group_logits = group_logits + self.group_log_sizes.T[:, None, :]
        opened = group_logits.amax(dim=1).topk(min(explore, self.groups.shape[0])).indices
        width = self.members.shape[2]
        members = self.members.transpose(0, 1)  # [Hkv, G, M]
        candidates = members.gather(1, opened[..., None].expand(-1, -1, width)).flatten(1)
        valid = candidates >= 0  # [Hkv, K]
        safe = candidates.clamp(min=0)
        cand_centroids = self.centroids.transpose(0, 1).gather(
            1, safe[..., None].expand(-1, -1, self.centroids.shape[-1])
        )
        cand_sizes = self.log_sizes.T.gather(1, safe).masked_fill(~valid, NEG_INF)
        cand_logits = torch.einsum("hrd,hkd->hrk", queries, cand_centroids)
        cand_logits = cand_logits + cand_sizes[:, None, :]
        later = torch.einsum("hrd,chd->hrc", queries, self.centroids[fixed:]) + sizes[..., fixed:]
        closed = torch.ones_like(group_logits[:, 0], dtype=torch.bool).scatter(1, opened, False)
        closed_logits = group_logits.masked_fill(~closed[:, None, :], NEG_INF)
        norm = torch.logsumexp(torch.cat([cand_logits, later, closed_logits], -1), -1, True)
        out = queries.new_full((heads, rows, total + 1), NEG_INF)  # column `total`: padding
        where = torch.where(valid, candidates, total)[:, None, :].expand(-1, rows, -1)
        out.scatter_(2, where, cand_logits - norm)
        out[..., fixed:total] = later - norm
        scored = (cand_sizes > NEG_INF).sum()
        return out[..., :total], scored

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors that rebuild the index (saved with the session)."""
        return {
            "centroids": self.centroids,
            "log_sizes": self.log_sizes,
            "page_cluster": self.page_cluster,
            "positions": self.positions,
            "groups": self.groups,
            "group_log_sizes": self.group_log_sizes,
            "members": self.members,
            "fixed_clusters": torch.tensor(self.fixed_clusters),
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> ClusterIndex:
        """The index `state` saved."""
        return cls(
            centroids=state["centroids"],
            log_sizes=state["log_sizes"],
            page_cluster=state["page_cluster"],
            positions=state["positions"],
            groups=state["groups"],
            group_log_sizes=state["group_log_sizes"],
            members=state["members"],
            fixed_clusters=int(state["fixed_clusters"]),
        )


def build(
    keys: torch.Tensor,
    positions: torch.Tensor,
    *,
    clusters: int,
    page_size: int,
    groups: float | None,
    seed: int,
    iterations: int,
) -> tuple[ClusterIndex, PageLayout]:
    """Cluster a fixed context's keys [Hkv, T, D] (at absolute `positions` [T]) per KV head
    into `clusters` clusters, with `groups` × the non-empty clusters as second-level groups
    (None: no second level), and lay every head's tokens out by cluster in pages of
    `page_size` rows: the index, and the layout for the layer to write."""
    heads, length, dim = keys.shape
    device = keys.device
    count = min(clusters, length)
    centroids = torch.zeros(count, heads, dim, device=device)
    sizes = torch.zeros(count, heads, dtype=torch.long, device=device)
    orders, page_clusters = [], []
    for head in range(heads):
        raw = keys[head].float()
        labels = kmeans_labels(unit(raw), count, seed=seed, iterations=iterations)
        sizes[:, head] = torch.bincount(labels, minlength=count)
        sums = torch.zeros(count, dim, device=device).index_add_(0, labels, raw)
        centroids[:, head] = sums / sizes[:, head, None].clamp(min=1)
        order, page_cluster = _pages_of(labels, sizes[:, head], page_size)
        orders.append(order)
        page_clusters.append(page_cluster)
    pages = max(len(p) for p in page_clusters)
    order = torch.full((pages, heads, page_size), -1, dtype=torch.long, device=device)
    page_cluster = torch.full((pages, heads), -1, dtype=torch.long, device=device)
    for head in range(heads):
        order[: len(orders[head]), head] = orders[head]
        page_cluster[: len(page_clusters[head]), head] = page_clusters[head]
    log_sizes = sizes.float().log()  # log 0 = -inf: an empty cluster is never chosen
    level2 = _groups(centroids, sizes, groups, seed=seed, iterations=iterations)
    index = ClusterIndex(
        centroids=centroids,
        log_sizes=log_sizes,
        page_cluster=page_cluster,
        positions=torch.where(order >= 0, positions[order.clamp(min=0)], -1),
        groups=level2[0],
        group_log_sizes=level2[1],
        members=level2[2],
        fixed_clusters=count,
    )
    page_centroids = centroids.transpose(0, 1)[
        torch.arange(heads, device=device), page_cluster.clamp(min=0)
    ]  # [P, Hkv, D]
    page_centroids = torch.where(page_cluster[..., None] >= 0, page_centroids, 0)
    lengths = (order >= 0).sum(dim=-1)
    summaries = page_centroids[:, :, None].to(keys.dtype)
    return index, PageLayout(order=order, lengths=lengths, summaries=summaries)


def _pages_of(
    labels: torch.Tensor, sizes: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's tokens by cluster: rows [pages, S] (token indices, -1 unused) and each
    page's cluster [pages]; cluster c takes ceil(size / S) pages, in cluster order."""
    device = labels.device
    by_cluster = torch.argsort(labels, stable=True)  # tokens of cluster 0, then 1, ...
    per_cluster = (sizes + page_size - 1) // page_size
    page_cluster = torch.repeat_interleave(torch.arange(len(sizes), device=device), per_cluster)
    first_page = torch.cumsum(per_cluster, 0) - per_cluster
    within = torch.arange(len(page_cluster), device=device) - first_page[page_cluster]
    first_token = torch.cumsum(sizes, 0) - sizes
    start = first_token[page_cluster] + within * page_size
    held = torch.clamp(sizes[page_cluster] - within * page_size, max=page_size)
    rows = torch.arange(page_size, device=device)
    slot = (start[:, None] + rows).clamp(max=len(labels) - 1)
    order = torch.where(rows < held[:, None], by_cluster[slot], -1)
    return order, page_cluster


def _groups(
    centroids: torch.Tensor,
    sizes: torch.Tensor,
    fraction: float | None,
    *,
    seed: int,
    iterations: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second-level groups per head: k-means over the unit non-empty centroids weighted by
    cluster size; a group's centroid is the size-weighted mean of its clusters' (the mean of
    their raw keys). Returns groups [G, Hkv, D], their log sizes [G, Hkv] and their member
    clusters [G, Hkv, M] (-1 padded); empty tensors when `fraction` is None."""
    heads, dim = centroids.shape[1:]
    device = centroids.device
    if fraction is None:
        return (
            torch.empty(0, heads, dim, device=device),
            torch.empty(0, heads, device=device),
            torch.empty(0, heads, 0, dtype=torch.long, device=device),
        )
    per_head = []
    for head in range(heads):
        used = torch.nonzero(sizes[:, head] > 0)[:, 0]
        wanted = max(1, math.ceil(fraction * len(used)))
        labels = kmeans_labels(
            unit(centroids[used, head]),
            wanted,
            seed=seed,
            iterations=iterations,
            weights=sizes[used, head],
        )
        per_head.append((used, labels, min(wanted, len(used))))
    total = max(g for _, _, g in per_head)
    width = max(int(torch.bincount(labels).max()) for _, labels, _ in per_head)
    groups = torch.zeros(total, heads, dim, device=device)
    group_sizes = torch.zeros(total, heads, device=device)
    members = torch.full((total, heads, width), -1, dtype=torch.long, device=device)
    for head, (used, labels, g) in enumerate(per_head):
        weight = sizes[used, head].float()
        group_sizes[:g, head] = torch.zeros(g, device=device).index_add_(0, labels, weight)
        sums = torch.zeros(g, dim, device=device).index_add_(
            0, labels, centroids[used, head] * weight[:, None]
        )
        groups[:g, head] = sums / group_sizes[:g, head, None].clamp(min=1)
        for group in range(g):
            inside = used[labels == group]
            members[group, head, : len(inside)] = inside
    return groups, group_sizes.log(), members
