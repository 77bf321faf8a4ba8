"""A small trainable page scorer for RetroLM, trained contrastively, kept as safetensors.

Input features are what the retrieval pass gives (`memlayer.kvretrieval.retrolm`): per layer
and KV head, the mean question query [L, Hkv, D] and each page's mean key [L, P, Hkv, D].
Over a band of layers they are normalised (the query to unit length per layer and head;
the page keys centred over the context's pages and scaled to unit RMS per layer and head,
so what all pages share, and layers' scales, drop out) and flattened to F features. The
score of a page is

    (diag ⊙ x_q) · x_p  +  (Q x_q) · (K x_p)

a weighted dot product (which layers, heads and channels matter) plus a low-rank bilinear
term (rank r, 0: none). That is the `channels` kind (F = layers · KV heads · head dim
weights on the diagonal alone). The `heads` kind scores the training-free ranking's own
features instead: per layer and KV head, the question's similarity to each page z-scored
over the pages (`head_z_scores`), x_q = 1 and x_p the F = layers · KV heads z-scores, so its
identity start *is* the training-free ranking and training learns which layers and heads to
trust: layers · KV heads weights (90 for SmolLM2), not thousands, for the few dozen
(question, page) pairs a benchmark generates. Training minimises InfoNCE over the pages of
each example's context: the page holding the answer against every other page.

The file stores the three tensors and, in its metadata, the kind, the model geometry it was
trained for and the model's fingerprint (`memlayer.kvretrieval.model.fingerprint`, as saved
sessions and KV contexts keep it), so another model is refused: one of another shape by its
geometry, one of the same shape with other weights by its fingerprint. Files saved before
the fingerprint was kept load with a warning (their geometry is still checked); files
without a kind are `channels`.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from memlayer.errors import InvalidInputError, ModelMismatchError

FORMAT = "memlayer-retrolm-page-retriever"
VERSION = "1"
_GEOMETRY = ("layers", "kv_heads", "head_dim", "first", "last", "rank")
KINDS = ("channels", "heads")


def head_z_scores(questions: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """Per layer and KV head, mean question query · each page's mean key ([L, Hkv, D] ·
    [L, P, Hkv, D]), z-scored over the pages (so layers and heads of different scales vote
    alike): [L, Hkv, P]. RetroLM's training-free ranking is their mean."""
    similarity = torch.einsum("lhd,lphd->lhp", questions.float(), pages.float())
    mean = similarity.mean(dim=-1, keepdim=True)
    spread = similarity.std(dim=-1, keepdim=True, unbiased=False)
    return (similarity - mean) / (spread + 1e-6)


@dataclass(frozen=True)
class RetrievalExample:
    """One training or evaluation pair: a question's features [L, Hkv, D], its context's page
    features [L, P, Hkv, D] (shared by the context's questions), the answer's page index."""

    question: torch.Tensor
    pages: torch.Tensor
    answer: int


@dataclass
class PageRetriever:
    """The scorer's geometry (model layers, KV heads, head dim; the band [first, last) of
    layers it reads; the rank of its bilinear term), weights, the fingerprint of the model
    its features came from (None: unknown, e.g. a file saved before it was kept) and its
    kind of features (`channels` or `heads`, see the module)."""

    layers: int
    kv_heads: int
    head_dim: int
    first: int
    last: int
    rank: int
    diag: torch.Tensor  # [F]
    query: torch.Tensor  # [r, F]
    page: torch.Tensor  # [r, F]
    fingerprint: str | None = None
    kind: str = "channels"

    @property
    def width(self) -> int:
        """F: features per question or page."""
        per_head = self.head_dim if self.kind == "channels" else 1
        return (self.last - self.first) * self.kv_heads * per_head

    @classmethod
    def create(
        cls,
        layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        first: int = 0,
        last: int | None = None,
        rank: int = 32,
        init: Literal["identity", "random"] = "identity",
        seed: int = 0,
        fingerprint: str | None = None,
        kind: str = "channels",
    ) -> PageRetriever:
        """A new scorer. `identity`: diag = 1 / (layers · KV heads) and K = 0, the mean over
        layers and heads of the normalised dot products (`heads`: exactly the training-free
        ranking), to start from; `random`: every weight drawn at random (a baseline for
        training). `rank` 0: no bilinear term. `fingerprint`: the model's (see
        `memlayer.kvretrieval.model.fingerprint`) whose features it will score."""
        last = layers if last is None else last
        if not 0 <= first < last <= layers:
            raise InvalidInputError("band", f"must satisfy 0 <= first < last <= {layers}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise InvalidInputError("rank", "must be an integer of at least 0", rank)
        if kind not in KINDS:
            raise InvalidInputError("kind", f"must be one of {KINDS}", kind)
        width = (last - first) * kv_heads * (head_dim if kind == "channels" else 1)
        generator = torch.Generator().manual_seed(seed)
        query = torch.randn(rank, width, generator=generator) / math.sqrt(width)
        scale = 1 / ((last - first) * kv_heads)  # a mean over the band's layers and heads
        if init == "identity":
            diag, page = torch.full((width,), scale), torch.zeros(rank, width)
        elif init == "random":
            diag = torch.randn(width, generator=generator) * scale
            page = torch.randn(rank, width, generator=generator) / math.sqrt(width)
        else:
            raise InvalidInputError("init", "must be 'identity' or 'random'", init)
        return cls(
            layers, kv_heads, head_dim, first, last, rank, diag, query, page, fingerprint, kind
        )

    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors."""
        return [self.diag, self.query, self.page]

    def check(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        fingerprint: str | None = None,
        *,
        source: str = "the page retriever",
    ) -> None:
        """Refuse a model this scorer was not trained for: InvalidInputError for another
        geometry; ModelMismatchError, naming both fingerprints, for a model of the same
        geometry with other weights (its features would be another model's, and the scores
        quietly meaningless). With `fingerprint` given and none kept in the scorer (a file
        saved before fingerprints were kept) a warning says the model cannot be checked."""
        mine = (self.layers, self.kv_heads, self.head_dim)
        if (layers, kv_heads, head_dim) != mine:
            raise InvalidInputError(
                "retriever",
                f"was trained for a model with {mine[0]} layers, {mine[1]} KV heads of "
                f"{mine[2]} dims; this model has {layers}, {kv_heads} of {head_dim}",
            )
        if fingerprint is None:
            return
        if self.fingerprint is None:
            warnings.warn(
                f"{source} keeps no model fingerprint (saved before memlayer kept one, or "
                "made without one): only its geometry was checked; set its `fingerprint` and "
                "save it again to check the model too",
                UserWarning,
                stacklevel=2,
            )
        elif self.fingerprint != fingerprint:
            raise ModelMismatchError(
                f"{source} was trained on the model with fingerprint {self.fingerprint}; "
                f"this model's fingerprint is {fingerprint}"
            )

    def features(
        self, questions: torch.Tensor, pages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_q [F] and x_p [P, F] from question [L, Hkv, D] and page [L, P, Hkv, D] features."""
        band = slice(self.first, self.last)
        if self.kind == "heads":
            z = head_z_scores(questions[band], pages[band])  # [L, Hkv, P]
            return z.new_ones(self.width), z.flatten(0, 1).T
        q = questions[band].float()
        q = q / (q.norm(dim=-1, keepdim=True) + 1e-6)
        p = pages[band].float()
        p = p - p.mean(dim=1, keepdim=True)
        p = p / (p.pow(2).mean(dim=(1, 3), keepdim=True).sqrt() + 1e-6)
        return q.flatten(), p.transpose(0, 1).flatten(1)

    def scores_of(self, xq: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
        """Scores [P] of features x_q [F], x_p [P, F]."""
        diag, query, page = (t.to(xq.device) for t in self.parameters())
        return _score(diag, query, page, xq, xp)

    def scores(self, questions: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """Scores [P] of the pages for a question (features as `features` takes them)."""
        return self.scores_of(*self.features(questions, pages))

    # -- file ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the scorer to a safetensors file (atomically: a temporary file renamed)."""
        from safetensors.torch import save_file

        target = Path(path)
        metadata = {"format": FORMAT, "version": VERSION}
        metadata |= {key: str(getattr(self, key)) for key in _GEOMETRY}
        if self.fingerprint is not None:
            metadata["fingerprint"] = self.fingerprint
        if self.kind != "channels":  # files without it (older ones) are `channels`
            metadata["kind"] = self.kind
        tensors = {
            name: t.detach().float().cpu().contiguous()
            for name, t in zip(("diag", "query", "page"), self.parameters(), strict=True)
        }
        partial = target.with_name(target.name + ".partial")
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PageRetriever:
        """Read a file `save` wrote; InvalidInputError (field `retriever`) for a missing file
        or one that is not a page retriever of this format."""
        from safetensors import SafetensorError, safe_open

        source = Path(path)
        if not source.is_file():
            raise InvalidInputError("retriever", "is not a file", str(source))
        try:
            with safe_open(str(source), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidInputError(
                "retriever", f"is not a safetensors file ({exc})", str(source)
            ) from exc
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise InvalidInputError(
                "retriever", f"is not a {FORMAT} file of version {VERSION}", str(source)
            )
        try:
            layers, kv_heads, head_dim, first, last, rank = (int(metadata[k]) for k in _GEOMETRY)
            retriever = cls(
                layers,
                kv_heads,
                head_dim,
                first,
                last,
                rank,
                tensors["diag"],
                tensors["query"],
                tensors["page"],
                metadata.get("fingerprint") or None,
                metadata.get("kind", "channels"),
            )
        except (KeyError, ValueError) as exc:
            raise InvalidInputError("retriever", f"lacks {exc}", str(source)) from exc
        if retriever.kind not in KINDS:
            raise InvalidInputError("retriever", f"has an unknown kind {retriever.kind!r}")
        width, rank = retriever.width, retriever.rank
        shapes = [tuple(t.shape) for t in retriever.parameters()]
        if shapes != [(width,), (rank, width), (rank, width)]:
            raise InvalidInputError("retriever", "has tensors of the wrong shape", str(source))
        return retriever


def train(
    retriever: PageRetriever,
    examples: Sequence[RetrievalExample],
    *,
    steps: int = 300,
    batch: int = 16,
    lr: float = 0.01,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Fit `retriever` in place by InfoNCE (softmax over each context's pages, the answer's
    page the positive) with Adam, on batches drawn with a fixed seed; the loss per step.

    `weight_decay` pulls the diagonal towards its start (with the identity start: towards
    the plain normalised dot product) and the bilinear term towards 0, as the pairs a
    benchmark generates are few next to the features (F = layers · KV heads · head dim)."""
    if not examples:
        raise InvalidInputError("examples", "must not be empty")
    if steps < 1:
        raise InvalidInputError("steps", "must be a positive integer", steps)
    cached: dict[int, torch.Tensor] = {}
    rows = []
    for example in examples:
        xq, xp = retriever.features(example.question, example.pages)
        if retriever.kind == "channels":  # page features without the question: one per context
            xp = cached.setdefault(id(example.pages), xp)
        rows.append((xq, xp, example.answer))
    start = retriever.diag.detach().clone().float()
    params = [t.detach().clone().float().requires_grad_(True) for t in retriever.parameters()]
    # Adam moves every weight by about `lr` a step whatever its size, and a score sums F
    # products: steps shrink as 1 / F (from 64 features on), else the thousands of weights
    # moving together would blow the logits up within a few steps on a real model
    step = lr * min(1.0, 64 / retriever.width)
    optimizer = torch.optim.Adam(params, lr=step)
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        picked = rng.sample(rows, min(batch, len(rows)))
        loss = torch.zeros(())
        for xq, xp, answer in picked:
            logits = _score(params[0], params[1], params[2], xq, xp)
            loss = loss + torch.nn.functional.cross_entropy(logits[None], torch.tensor([answer]))
        loss = loss / len(picked)
        # the weights stay near where they started (the diagonal) and small (the bilinear term)
        penalty = weight_decay * (
            (params[0] - start).pow(2).sum() + params[1].pow(2).sum() + params[2].pow(2).sum()
        )
        optimizer.zero_grad()
        (loss + penalty).backward()
        optimizer.step()
        losses.append(loss.item())
    retriever.diag, retriever.query, retriever.page = (p.detach() for p in params)
    return losses


def _score(
    diag: torch.Tensor, query: torch.Tensor, page: torch.Tensor, xq: torch.Tensor, xp: torch.Tensor
) -> torch.Tensor:
    """(diag ⊙ x_q) · x_p + (Q x_q) · (K x_p) for every page: [P]."""
    return xp @ (diag * xq) + (xp @ page.T) @ (query @ xq)


def recall_at(scores: Sequence[torch.Tensor], answers: Sequence[int], k: int) -> float:
    """Share of questions whose answer page is among the k best-scored pages."""
    hits = sum(
        answer in torch.topk(s, min(k, s.shape[0])).indices.tolist()
        for s, answer in zip(scores, answers, strict=True)
    )
    return hits / len(answers) if answers else 0.0
