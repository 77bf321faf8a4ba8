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
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        cos0, _ = self._compute(torch.zeros(1, dtype=torch.long, device=device))
        self.scale = cos0[0]  # what rotation at position 0 multiplies by (1 unless scaled RoPE)
        self._plain = bool((self.scale == 1).all())  # read once: no host sync per call

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
        self._cast.clear()

    def _tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin tables in `dtype`, made once per growth instead of per call.

        rotate_half(x) · sin equals roll(x, D/2) · sin with its first half negated, which
        `_apply` uses: one roll instead of a negation, two slices and a concatenation."""
        if dtype not in self._cast:
            half = self._sin.shape[-1] // 2
            signed = torch.cat((-self._sin[:, :half], self._sin[:, half:]), dim=-1)
            self._cast[dtype] = (self._cos.to(dtype), signed.to(dtype))
        return self._cast[dtype]

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the rotation at position 0 the model applied (identity for plain RoPE)."""
        return x if self._plain else x / self.scale.to(x.dtype)

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x [..., T, D] (unrotated) to positions start, start + 1, ..., start + T - 1.

        `start` is a host integer, so no position is read back from the device."""
        end = start + x.shape[-2]
        self._ensure(end)
        cos, sin = self._tables(x.dtype)
        return self._apply(x, cos[start:end], sin[start:end])

    def rotate_to(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """Rotate every row of x [..., T, D] (unrotated) to the same `position`."""
        self._ensure(position + 1)
        cos, sin = self._tables(x.dtype)
        return self._apply(x, cos[position], sin[position])

    def unrotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Inverse of `rotate`: x [..., T, D] rotated at start, ..., start + T - 1 back to the
        unrotated, unscaled vectors (what `unscale` gives for a key the model rotated at 0).

        With cos/sin scaled by s, rotate is s·R(p); its inverse is R(-p)/s = R(p)ᵀ/s, and
        R(p)ᵀ applied is x·cos - rotate_half(x)·sin, i.e. `_apply` with the sine negated."""
        end = start + x.shape[-2]
        self._ensure(end)
        cos, sin = self._tables(x.dtype)
        back = self._apply(x, cos[start:end], -sin[start:end])
        return back if self._plain else back / (self.scale * self.scale).to(x.dtype)

    @staticmethod
    def _apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
        return torch.addcmul(x * cos, rolled, signed_sin)
