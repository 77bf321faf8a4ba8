"""Frames to the token embeddings a language model reads: images through a VLM's vision side,
text frames through its embedding table. Every frame becomes exactly `tokens` embeddings, so
a frame is one page of the KV memory.

Two vision sides are read: LLaVA-OneVision's (a fixed image size, `get_video_features`) and
Qwen2-VL / Qwen2.5-VL's (any size a multiple of the merged patch, `get_image_features` on
flattened patches, each token at its own row and column of multimodal RoPE).
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
# OpenAI CLIP's (Qwen2-VL's and Qwen2.5-VL's image processors)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GRID_FRAME_SIZE = 392  # default side for Qwen2-VL frames: 28 x 28 patches -> 14 x 14 tokens


def vision_side(model: Any) -> Any:
    """The module with `get_video_features` (LLaVA-OneVision family), or None for a text LM."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "get_video_features"):
            return candidate
    return None


def _checked(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """RGB uint8 frames [H, W, 3] of one size stacked [n, H, W, 3] (InvalidInputError if not)."""
    for frame in frames:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise InvalidInputError("frame", "must be an RGB uint8 array [H, W, 3]", frame.shape)
    if len({f.shape for f in frames}) != 1:
        raise InvalidInputError("frame", "frames of one chunk must share a size")
    return torch.from_numpy(np.stack([np.ascontiguousarray(f) for f in frames]))


def _normalised(
    batch: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """uint8 frames [n, H, W, 3] as float [n, 3, size, size], resized and normalised."""
    x = batch.to(mean.device).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - mean) / std


def image_frames(
    model: Any,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    size: int | None = None,
) -> ImageFrames | GridImageFrames | None:
    """The image encoder for `model`'s vision side (None for a text-only model)."""
    vision = getattr(model.config, "vision_config", None)
    if vision is not None and hasattr(vision, "spatial_merge_size"):
        return GridImageFrames(model, mean=mean or CLIP_MEAN, std=std or CLIP_STD, size=size)
    if vision is not None and vision_side(model) is not None:
        frames = ImageFrames(model, mean=mean or SIGLIP_MEAN, std=std or SIGLIP_STD)
        if size is not None and size != frames.size:
            raise InvalidInputError(
                "frame_size", f"is the vision tower's image_size ({frames.size}) for this model"
            )
        return frames
    if size is not None:
        raise InvalidInputError(
            "frame_size", f"applies to image frames; {type(model).__name__} reads text frames"
        )
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
        self.mean, self.std = list(mean), list(std)
        self.size = int(vision.image_size)
        side_patches = self.size // int(vision.patch_size)
        self.tokens = (-(-side_patches // 2)) ** 2  # the patch grid after 2x2 pooling
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype
        self._mean = torch.tensor(mean, device=self._device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self._device).view(1, 3, 1, 1)

    def pixels(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Frames resized to the vision tower's size and normalised: [n, 3, size, size]."""
        return _normalised(_checked(frames), self.size, self._mean, self._std).to(self._dtype)

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


class GridImageFrames:
    """RGB frames -> `tokens` embeddings each through Qwen2-VL's / Qwen2.5-VL's vision side:
    each frame resized to `size` (a multiple of patch x merge), read as one image (the
    frame repeated over the temporal patch, as the model's processor does for an image),
    flattened to patches and merged 2 x 2 (`get_image_features`). Token t of a frame sits
    at row `t // columns`, column `t % columns` of the merged grid (`positions`)."""

    def __init__(
        self,
        model: Any,
        *,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        size: int | None = None,
    ):
        vision = model.config.vision_config
        side = getattr(model, "model", model)
        if not hasattr(side, "get_image_features"):
            raise UnsupportedModelError(f"{type(model).__name__} has no get_image_features")
        self._side = side
        self.patch = int(vision.patch_size)
        self.merge = int(vision.spatial_merge_size)
        self.temporal = int(vision.temporal_patch_size)
        self.size = GRID_FRAME_SIZE if size is None else size
        unit = self.patch * self.merge
        if self.size < unit or self.size % unit:
            raise InvalidInputError(
                "frame_size", f"must be a positive multiple of {unit} (patch x merge)", size
            )
        self.columns = self.size // unit
        self.tokens = self.columns**2
        self.mean, self.std = list(mean), list(std)
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype
        self._mean = torch.tensor(mean, device=self._device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self._device).view(1, 3, 1, 1)

    @property
    def positions(self) -> torch.Tensor:
        """Each token's (time, row, column) offset from its frame's start [3, tokens]."""
        index = torch.arange(self.tokens)
        rows, columns = index // self.columns, index % self.columns
        return torch.stack([torch.zeros_like(index), rows, columns])

    def patches(self, frames: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The vision side's input for n frames: flattened patches [n·P, 3·temporal·patch²],
        merge groups contiguous (the model processor's order), and the grid [n, 3]."""
        x = _normalised(_checked(frames), self.size, self._mean, self._std)
        n, grid, merge, patch = x.shape[0], self.size // self.patch, self.merge, self.patch
        x = x[:, None].expand(n, self.temporal, 3, self.size, self.size)
        x = x.reshape(n, self.temporal, 3, grid // merge, merge, patch, grid // merge, merge, patch)
        # -> frame, merged row, merged column, row in group, column in group, channel, time, patch
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = x.reshape(n * grid * grid, 3 * self.temporal * patch * patch)
        thw = torch.tensor([[1, grid, grid]] * n, device=self._device)
        return flat.to(self._dtype), thw

    def embed(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Embeddings [n, tokens, hidden] of n frames (one batch through the vision side)."""
        pixels, grid = self.patches(frames)
        with torch.no_grad():
            output = self._side.get_image_features(pixels, grid)
        features = output.pooler_output if hasattr(output, "pooler_output") else output
        stacked = torch.stack(list(features))
        if stacked.shape[1] != self.tokens:
            raise UnsupportedModelError(
                f"{type(self._side).__name__}.get_image_features gave {stacked.shape[1]} "
                f"embeddings a frame, not {self.tokens}"
            )
        return stacked


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
