"""Frames to the token embeddings a language model reads: images through a VLM's vision side,
text frames through its embedding table. Every frame becomes exactly `tokens` embeddings, so
a frame is one page of the KV memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from memlayer.errors import InvalidInputError, UnsupportedModelError

# SigLIP's normalisation (LLaVA-OneVision's vision tower), used when no processor config says
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def vision_side(model: Any) -> Any:
    """The module with `get_video_features` (LLaVA-OneVision family), or None for a text LM."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "get_video_features"):
            return candidate
    return None


class ImageFrames:
    """RGB frames [H, W, 3] uint8 -> `tokens` embeddings each, through the model's own video
    path (vision tower, projector, 2x2 pooling: `get_video_features`), without the newline
    embedding LLaVA-OneVision appends once after a whole video."""

    def __init__(
        self,
        model: Any,
        *,
        mean: Sequence[float] = SIGLIP_MEAN,
        std: Sequence[float] = SIGLIP_STD,
    ):
        side = vision_side(model)
        vision = getattr(model.config, "vision_config", None)
        if side is None or vision is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no video path (get_video_features); image frames "
                "need a LLaVA-OneVision-style model"
            )
        self._side = side
        self.size = int(vision.image_size)
        side_patches = self.size // int(vision.patch_size)
        self.tokens = (-(-side_patches // 2)) ** 2  # the patch grid after 2x2 pooling
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype
        self._mean = torch.tensor(mean, device=self._device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self._device).view(1, 3, 1, 1)

    def pixels(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Frames resized to the vision tower's size and normalised: [n, 3, size, size]."""
        for frame in frames:
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise InvalidInputError(
                    "frame", "must be an RGB uint8 array [H, W, 3]", frame.shape
                )
        batch = torch.from_numpy(np.stack([np.ascontiguousarray(f) for f in frames]))
        if len({f.shape for f in frames}) != 1:
            raise InvalidInputError("frame", "frames of one chunk must share a size")
        x = batch.to(self._device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True
            )
        return ((x - self._mean) / self._std).to(self._dtype)

    def embed(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Embeddings [n, tokens, hidden] of n frames (one batch through the vision tower)."""
        with torch.no_grad():  # positional: transformers renamed it (5.17 pixel_values)
            output = self._side.get_video_features(self.pixels(frames)[None])
        features = output.pooler_output if hasattr(output, "pooler_output") else output
        # newer transformers append the newline embedding here, 5.17 in forward
        expected = len(frames) * self.tokens
        if features.shape[1] not in (expected, expected + 1):
            raise UnsupportedModelError(
                f"{type(self._side).__name__}.get_video_features gave {features.shape[1]} "
                f"embeddings for {len(frames)} frames of {self.tokens}"
            )
        features = features[:, :expected]
        return features.reshape(len(frames), self.tokens, features.shape[-1])


class TextFrames:
    """Text frames -> exactly `tokens` embeddings each: the frame's tokens, then `pad` up to
    `tokens` (a frame longer than that is refused), through the model's embedding table."""

    def __init__(self, model: Any, tokenizer: Any, tokens: int, pad: int):
        if tokenizer is None:
            raise InvalidInputError("tokenizer", "text frames need the model's tokenizer")
        self._embedding = model.get_input_embeddings()
        self._tokenizer = tokenizer
        self.tokens = tokens
        self._pad = pad

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each frame, padded to `tokens`."""
        out = []
        for text in texts:
            ids = list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) > self.tokens:
                raise InvalidInputError(
                    "frame",
                    f"has {len(ids)} tokens; a text frame holds at most frame_tokens={self.tokens}",
                    text[:80],
                )
            out.append(ids + [self._pad] * (self.tokens - len(ids)))
        return out

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings [n, tokens, hidden] of n text frames."""
        weight = self._embedding.weight
        ids = torch.tensor(self.ids(texts), device=weight.device)
        with torch.no_grad():
            return self._embedding(ids)
