"""External frame retrievers: embed frames as they stream and questions when they come, in one
vector space, so a video session can pick frames without the language model's queries.

A `FrameRetriever` is `Embedder`-like: `embed_frames(frames)` and `embed_query(text)` return
float32 unit vectors of `dim`. `ClipFrameRetriever` is a CLIP or SigLIP checkpoint from a
local folder (images and questions through its two towers); `TextFrameRetriever` wraps any
memlayer `Embedder` for text frames (MiniLM by default), optionally with keyword terms.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from memlayer.embedders import Embedder, HashEmbedder, embed_checked, resolve_embedder
from memlayer.errors import InvalidInputError
from memlayer.optional import require
from memlayer.video_input import Frame

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class FrameRetriever(Protocol):
    """Embeds frames and questions into one space (float32 unit vectors of `dim`)."""

    dim: int
    name: str

    def embed_frames(self, frames: Sequence[Frame]) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


class ClipFrameRetriever:
    """A CLIP or SigLIP model from a local folder (loaded with transformers' `AutoModel`,
    never downloaded): frames through the image tower, questions through the text tower.

    Normalisation comes from the folder's `preprocessor_config.json` when it has one (else
    CLIP's, or SigLIP's 0.5 for a SigLIP model); frames are resized to the tower's size.
    """

    def __init__(self, path: str | Path, *, device: str | None = None):
        require("transformers", "kv")
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise InvalidInputError("retriever", "must name a local model folder", str(path))
        self._torch = torch
        self._model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self._model.to(device or "cpu")
        self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        vision = self._model.config.vision_config
        self._size = int(vision.image_size)
        siglip = "siglip" in self._model.config.model_type
        mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (_CLIP_MEAN, _CLIP_STD)
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            config = json.loads(processor.read_text())
            mean, std = config.get("image_mean", mean), config.get("image_std", std)
        self._padding = "max_length" if siglip else True  # SigLIP was trained on padded text
        param = next(self._model.parameters())
        self._device = param.device
        self._mean = torch.tensor(mean, device=param.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=param.device).view(1, 3, 1, 1)
        self.name = f"clip:{folder.name}"
        self.dim = int(self.embed_query("dimension probe").shape[0])

    def embed_frames(self, frames: Sequence[Frame]) -> np.ndarray:
        """Image embeddings [n, dim] of RGB uint8 frames (text frames go through the text tower)."""
        if all(isinstance(frame, str) for frame in frames):
            return np.stack([self.embed_query(str(frame)) for frame in frames])
        torch = self._torch
        if any(isinstance(frame, str) for frame in frames):
            raise InvalidInputError("frame", "a chunk mixes text and image frames")
        batch = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).to(self._device)
        x = batch.permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.interpolate(
            x, size=(self._size, self._size), mode="bilinear", antialias=True
        )
        with torch.no_grad():
            features = self._model.get_image_features(pixel_values=(x - self._mean) / self._std)
        features = getattr(features, "pooler_output", features)
        return _unit(features.float().cpu().numpy())

    def embed_query(self, text: str) -> np.ndarray:
        """Text embedding [dim] of a question."""
        tokens = self._tokenizer(
            [text], padding=self._padding, truncation=True, return_tensors="pt"
        ).to(self._device)
        with self._torch.no_grad():
            features = self._model.get_text_features(**tokens)
        features = getattr(features, "pooler_output", features)
        return _unit(features.float().cpu().numpy())[0]


class TextFrameRetriever:
    """Text frames and questions through one memlayer `Embedder` (MiniLM when None; any
    name, folder, Embedder or callable `resolve_embedder` takes), and with `terms` > 0
    through a bag of hashed keyword terms too, weighted `terms` against the embedder's
    `1 - terms` (their cosines add up in one vector): a sentence embedder blurs names,
    codes and times ("0:23:02" ranks its frame first for 72% of event questions in a
    2,000-frame log with MiniLM alone, 100% with terms), which keyword terms match exactly.
    `terms=1` uses the terms alone (no model)."""

    def __init__(
        self,
        embedder: Embedder | str | Path | Callable[[list[str]], Any] | None = None,
        *,
        terms: float = 0.0,
        terms_dim: int = 4096,
    ):
        if isinstance(terms, bool) or not isinstance(terms, (int, float)) or not 0 <= terms <= 1:
            raise InvalidInputError("terms", "must be a number from 0 to 1", terms)
        self._embedder = resolve_embedder(embedder) if terms < 1 else None
        self._terms = HashEmbedder(terms_dim) if terms > 0 else None
        self._weights = (math.sqrt(1 - terms), math.sqrt(terms))
        parts = [part for part in (self._embedder, self._terms) if part is not None]
        self.dim = sum(part.dim for part in parts)
        self.name = "text:" + "+".join(part.name for part in parts)

    def embed_frames(self, frames: Sequence[Frame]) -> np.ndarray:
        texts = []
        for frame in frames:
            if not isinstance(frame, str):
                raise InvalidInputError("frame", "a text frame retriever embeds text frames only")
            texts.append(frame)
        return self._embed(texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self._embed([text])[0]

    def _embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors: each part's unit vector scaled by the square root of its weight."""
        parts = [
            weight * _unit(embed_checked(part, texts))
            for part, weight in zip((self._embedder, self._terms), self._weights, strict=True)
            if part is not None
        ]
        return np.hstack(parts).astype(np.float32) if len(parts) > 1 else parts[0]
