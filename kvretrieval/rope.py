"""Rotary position embedding, applied by memlayer itself at positions it chooses.

The model is run with every position id set to 0, so queries and keys reach the attention
hook unrotated; memlayer rotates them with the model's own rotary module at the positions
its placement mode chooses (within the trained window, or exact absolute positions).
"""

from __future__ import annotations

from typing import Any

import torch

from memlayer.errors import UnsupportedModelError


def find_rotary(model: Any) -> Any:
    """The model's rotary embedding module (the one that turns position ids into cos/sin)."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} has no rotary embedding module memlayer can drive"
    )


class Rotary:
    """cos/sin tables from the model's rotary module, grown on demand, and `rotate`."""

    def __init__(self, module: Any, head_dim: int, device: torch.device, dtype: torch.dtype):
        self._module = module
        self._device = device
        self._dtype = dtype
        self._cos = torch.empty(0, head_dim, device=device, dtype=torch.float32)
        self._sin = torch.empty(0, head_dim, device=device, dtype=torch.float32)
        cos0, _ = self._compute(torch.zeros(1, dtype=torch.long, device=device))
        self.scale = cos0[0]  # what rotation at position 0 multiplies by (1 unless scaled RoPE)

    def _compute(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(1, device=self._device, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = self._module(probe, positions.view(1, -1))
        return cos[0].float(), sin[0].float()

    def _ensure(self, upto: int) -> None:
        if upto <= self._cos.shape[0]:
            return
        size = max(upto, 2 * self._cos.shape[0], 1024)
        cos, sin = self._compute(torch.arange(size, device=self._device))
        self._cos, self._sin = cos, sin

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the rotation at position 0 the model applied (identity for plain RoPE)."""
        return x if bool((self.scale == 1).all()) else x / self.scale.to(x.dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., T, D] (unrotated) to `positions` [T]."""
        self._ensure(int(positions.max()) + 1 if positions.numel() else 0)
        cos = self._cos[positions].to(x.dtype)
        sin = self._sin[positions].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
