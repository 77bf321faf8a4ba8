"""Pages to bytes and back, exactly: every dtype (bf16 included) and shape preserved.

Layout: 4-byte little-endian header length, a JSON header (id, kind, scope, metadata,
created_at and one (name, dtype, shape, offset, nbytes) row per tensor), then raw bytes.
Persistent tiers store this blob; decoding copies it once into fresh tensors.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

from memlayer.errors import CorruptionError, InvalidInputError
from memlayer.types import Page, Scope

_LEN = struct.Struct("<I")
_BYTES_FIELD = ""  # header marker: the payload is raw bytes, not named tensors

DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def check_payload(page: Page) -> None:
    """Raise InvalidInputError unless the payload is bytes or a dict of storable tensors."""
    if not isinstance(page.id, str) or not page.id or len(page.id.encode()) > 512:
        raise InvalidInputError("page.id", "must be a non-empty string of at most 512 bytes")
    payload = page.payload
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return
    if not isinstance(payload, dict) or not payload:
        raise InvalidInputError("page.payload", "must be bytes or a non-empty dict of tensors")
    for name, value in payload.items():
        if not isinstance(name, str) or not name:
            raise InvalidInputError("page.payload", "tensor names must be non-empty strings", name)
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(f"page.payload[{name!r}]", "must be a torch.Tensor", value)
        if value.dtype not in _NAMES:
            raise InvalidInputError(
                f"page.payload[{name!r}]",
                f"dtype {value.dtype} cannot be stored; supported: {', '.join(DTYPES)}",
            )


def _raw(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def encode(page: Page) -> bytes:
    """The page as one self-describing blob."""
    check_payload(page)
    chunks: list[bytes] = []
    rows: list[list[Any]] = []
    offset = 0
    if isinstance(page.payload, (bytes, bytearray, memoryview)):
        data = bytes(page.payload)
        chunks.append(data)
        rows.append([_BYTES_FIELD, "bytes", [len(data)], 0, len(data)])
    else:
        for name, tensor in page.payload.items():
            data = _raw(tensor)
            rows.append([name, _NAMES[tensor.dtype], list(tensor.shape), offset, len(data)])
            chunks.append(data)
            offset += len(data)
    header = json.dumps(
        {
            "id": page.id,
            "kind": page.kind,
            "scope": page.scope.as_dict(),
            "metadata": page.metadata,
            "created_at": page.created_at,
            "tensors": rows,
        },
        separators=(",", ":"),
    ).encode()
    return b"".join([_LEN.pack(len(header)), header, *chunks])


TensorLayout = list[tuple[str, torch.dtype, tuple[int, ...], int]]  # name, dtype, shape, nbytes


def read_header(prefix: bytes) -> tuple[int, Page, TensorLayout] | None:
    """From the first bytes of a blob: where its tensor bytes start, the page without its
    payload, and its tensors in order (their bytes follow one another from that start).
    None when `prefix` is too short, the payload is bytes, or anything does not parse: the
    caller then reads the whole blob, whose checksum says whether it is damaged."""
    try:
        (size,) = _LEN.unpack_from(prefix, 0)
        start = _LEN.size + size
        if start > len(prefix):
            return None
        header = json.loads(prefix[_LEN.size : start])
        layout: TensorLayout = []
        offset = 0
        for name, dtype_name, shape, at, nbytes in header["tensors"]:
            if name == _BYTES_FIELD or at != offset:
                return None
            layout.append((name, DTYPES[dtype_name], tuple(shape), nbytes))
            offset += nbytes
        page = Page(
            id=header["id"],
            payload=b"",
            kind=header["kind"],
            scope=Scope(**header["scope"]),
            metadata=header["metadata"],
            created_at=header["created_at"],
        )
    except (ValueError, KeyError, TypeError, IndexError, struct.error):
        return None
    return start, page, layout


def decode(blob: bytes | bytearray | memoryview) -> Page:
    """Rebuild a page from `encode`'s blob; tensors share a writable blob, else one copy."""
    view = memoryview(blob)
    try:
        (size,) = _LEN.unpack_from(view, 0)
        header = json.loads(bytes(view[_LEN.size : _LEN.size + size]))
        body = view[_LEN.size + size :]
        if body.readonly:
            body = memoryview(bytearray(body))
        rows = header["tensors"]
        payload: dict[str, Any] | bytes
        if len(rows) == 1 and rows[0][0] == _BYTES_FIELD:
            payload = bytes(body)
        else:
            payload = {}
            for name, dtype_name, shape, offset, nbytes in rows:
                raw = (
                    torch.frombuffer(body, dtype=torch.uint8, count=nbytes, offset=offset)
                    if nbytes
                    else torch.empty(0, dtype=torch.uint8)
                )
                payload[name] = raw.view(DTYPES[dtype_name]).reshape(shape)
        return Page(
            id=header["id"],
            payload=payload,
            kind=header["kind"],
            scope=Scope(**header["scope"]),
            metadata=header["metadata"],
            created_at=header["created_at"],
        )
    except (ValueError, KeyError, TypeError, IndexError, struct.error, RuntimeError) as exc:
        raise CorruptionError(f"page blob is malformed: {exc}") from exc
