"""A layer's local window and sink tokens in preallocated buffers, written in place.

The window keeps each key twice: unrotated (what sealing summarizes and places) and rotated
once, when it arrives, at its position counted from `base`. Attention inside the window
depends only on the distance between a query and a key, so queries are rotated from the
same `base` and no key is rotated again while it stays. Tokens leave at the front; when
the buffer's end is reached the window moves back to its start in one copy (every
capacity / 2 tokens or so), and in InfLLM's placement `base` moves to the window's start
there, so positions stay as small as the window itself.
"""

from __future__ import annotations

import torch

from memlayer.kernels import window_put
from memlayer.kvretrieval.config import KVConfig
from memlayer.kvretrieval.rope import Rotary


class WindowBuffer:
    """The local window of one layer: unrotated keys, rotated keys and values [Hkv, n, D]."""

    def __init__(
        self,
        config: KVConfig,
        rotary: Rotary,
        heads: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        exact: bool,
    ):
        self.rotary = rotary
        self.heads = heads
        self.exact = exact  # rotate at absolute positions (base stays 0)
        self.capacity = 2 * (config.n_local + config.block_size + config.chunk_size)
        self._raw, self._rot, self._val = (
            torch.empty(heads, self.capacity, dim, dtype=dtype, device=device) for _ in range(3)
        )
        self.head = 0  # buffer index of the window's first token
        self.length = 0  # tokens in the window
        self.start = 0  # absolute position of the window's first token
        self.base = 0  # absolute position that rotated keys and queries count from

    @property
    def end(self) -> int:
        """Absolute position one past the window's last token."""
        return self.start + self.length

    def raw_keys(self) -> torch.Tensor:
        """Unrotated keys of the window (a view into the buffer)."""
        return self._raw[:, self.head : self.head + self.length]

    def keys(self) -> torch.Tensor:
        """Keys rotated at their positions counted from `base` (a view into the buffer)."""
        return self._rot[:, self.head : self.head + self.length]

    def values(self) -> torch.Tensor:
        """Values of the window (a view into the buffer)."""
        return self._val[:, self.head : self.head + self.length]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write a chunk's unrotated keys and values [Hkv, T, D] after the window's last
        token, rotating the keys once (a decode token's in one C call on the CPU)."""
        count = keys.shape[1]
        if self.head + self.length + count > self.capacity:
            self._move_to_front(count)
        at = self.head + self.length
        first = self.end - self.base
        tables = self.rotary.tables(first + count, keys.dtype)
        if not window_put(keys, values, tables, first, self._buffers(), at):
            self._raw[:, at : at + count] = keys
            self._val[:, at : at + count] = values
            self._rot[:, at : at + count] = self.rotary.rotate(keys, first)
        self.length += count

    def rotate_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Rotate the newest T queries [..., T, D] (unrotated) to their window positions."""
        return self.rotary.rotate(queries, self.end - queries.shape[-2] - self.base)

    def drop(self, count: int) -> None:
        """Forget the window's first `count` tokens (now sinks or pages)."""
        self.head += count
        self.length -= count
        self.start += count

    def reset(self, raw_keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Make the window `raw_keys` / `values` [Hkv, n, D] from absolute position `start`."""
        self.head, self.length, self.start = 0, 0, start
        self.base = 0 if self.exact else start
        self.append(raw_keys, values)

    def _move_to_front(self, incoming: int) -> None:
        """Copy the window to the buffer's start (growing the buffer if `incoming` more
        tokens would not fit); in InfLLM's placement re-rotate it from its new base."""
        need = self.length + incoming
        if need > self.capacity:
            self.capacity = max(2 * self.capacity, need)
            grown = [t.new_empty(t.shape[0], self.capacity, t.shape[2]) for t in self._buffers()]
        else:
            grown = list(self._buffers())
        span = slice(self.head, self.head + self.length)
        for old, new in zip(self._buffers(), grown, strict=True):
            new[:, : self.length] = old[:, span].clone() if old is new else old[:, span]
        self._raw, self._rot, self._val = grown
        self.head = 0
        if not self.exact:
            self.base = self.start
            self._rot[:, : self.length] = self.rotary.rotate(self.raw_keys(), 0)

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._raw, self._rot, self._val


class SinkBuffer:
    """The first `n_init` tokens' keys (placed as memory stores them) and values.

    Sinks are only ever appended, so a checkpoint is their count (`truncate` returns to it).
    A session on a fixed context starts from the context's sinks, shared (`share`): they are
    read in place, and copied only if this session adds sinks of its own (a context shorter
    than `n_init` tokens).
    """

    def __init__(
        self, capacity: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device
    ):
        self._keys = torch.empty(heads, capacity, dim, dtype=dtype, device=device)
        self._values = torch.empty_like(self._keys)
        self.count = 0
        self.shared = False  # the buffers belong to a fixed context: never written here

    def keys(self) -> torch.Tensor:
        return self._keys[:, : self.count]

    def values(self) -> torch.Tensor:
        return self._values[:, : self.count]

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append sink tokens [Hkv, n, D] (within the capacity `n_init`)."""
        if self.shared:  # copy on write: the context's sinks stay as they are
            self._keys, self._values = self._keys.clone(), self._values.clone()
            self.shared = False
        count = keys.shape[1]
        self._keys[:, self.count : self.count + count] = keys
        self._values[:, self.count : self.count + count] = values
        self.count += count

    def reset(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Make the sinks exactly `keys` / `values` [Hkv, n, D]."""
        if self.shared:
            self._keys, self._values = torch.empty_like(self._keys), torch.empty_like(self._values)
            self.shared = False
        self.count = 0
        self.add(keys, values)

    def share(self, keys: torch.Tensor, values: torch.Tensor, count: int) -> None:
        """Read the sinks from a fixed context's buffers [Hkv, n_init, D] (its first `count`
        tokens), without copying them."""
        if keys.shape != self._keys.shape or values.shape != self._values.shape:
            raise ValueError(f"shared sinks must be {tuple(self._keys.shape)}")
        self._keys, self._values, self.count, self.shared = keys, values, count, True

    def truncate(self, count: int) -> None:
        """Forget the sinks added after the first `count` (back to a checkpoint)."""
        self.count = min(self.count, count)
