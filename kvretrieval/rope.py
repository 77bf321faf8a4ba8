"""Rotary position embedding, applied by memlayer itself at positions it chooses.

The model is run with every position id set to 0, so queries and keys reach the attention
hook unrotated; memlayer rotates them with the model's own rotary module at the positions
its placement mode chooses (within the trained window, or exact absolute positions).

Multimodal RoPE (Qwen2-VL, Qwen2.5-VL) gives a token three positions (time, row, column),
each rotating its own section of the head dimension. A token whose three positions are
equal is rotated as by 1-D RoPE, and rotations add, so memlayer's 1-D placement stays as
it is: an image token additionally gets a fixed `TokenLayout` turn on arrival, the offset
of its three positions from the 1-D position memlayer gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memlayer.errors import UnsupportedModelError


def find_rotary(model: Any) -> Any:
    """The model's rotary embedding module (the one that turns position ids into cos/sin) on
    its language side: a vision tower may have a rotary module of its own (Qwen2-VL's)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for module in (decoder if decoder is not None else model).modules():
        if hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} has no rotary embedding module memlayer can drive"
    )


def identity_at_zero(model: Any) -> bool:
    """Whether the model's RoPE rotates by the identity at position 0 (cos 1, sin 0): plain
    RoPE, not a scaled one, which also multiplies by its attention scaling there. False
    for a model without a rotary module memlayer can drive."""
    try:
        module = find_rotary(model)
    except UnsupportedModelError:
        return False
    device = module.inv_freq.device
    probe = torch.empty(1, device=device, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = module(probe, torch.zeros(1, 1, dtype=torch.long, device=device))
    return bool((cos == 1).all() and (sin == 0).all())


@dataclass(frozen=True)
class TokenLayout:
    """A fixed rotation per token of a chunk (cos and signed sin [T, D]): the turn that moves
    a token from its 1-D position to its multimodal one, applied to its query and key."""

    cos: torch.Tensor
    signed_sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., T, D] turned token by token."""
        return Rotary._apply(x, self.cos.to(x.dtype), self.signed_sin.to(x.dtype))


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

    @property
    def multimodal(self) -> bool:
        """Whether the model's RoPE gives a token three positions (time, row, column)."""
        return hasattr(self._module, "mrope_section")

    def layout(self, offsets: torch.Tensor) -> TokenLayout:
        """The turn by multimodal positions `offsets` [3, T] (time, row, column) per token.

        A token memlayer places at 1-D position p then sits at p + offsets[:, t] in each of
        the three; `offsets` may be negative (the turn is a rotation by their angles)."""
        if not self.multimodal:
            raise UnsupportedModelError("the model's rotary embedding has one position a token")
        probe = torch.empty(1, device=self._device, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = self._module(probe, offsets.to(self._device).view(3, 1, -1))
        cos, sin = cos[0].float(), sin[0].float()
        if not self._plain:
            cos, sin = cos / self.scale, sin / self.scale
        half = sin.shape[-1] // 2
        return TokenLayout(cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))

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

    def tables(self, upto: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [N, D] in `dtype` for positions 0 .. at least upto - 1: what
        `rotate` applies, for a kernel that rotates rows itself."""
        self._ensure(upto)
        return self._tables(dtype)

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
