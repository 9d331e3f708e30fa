"""
The frame format of spool segments: one CRC-checked record per frame.

A segment is a sequence of frames, with no file header::

    +-----------------+-----------------+------------------------+
    | length: u32, BE | crc32: u32, BE  | payload: length bytes  |
    +-----------------+-----------------+------------------------+

``crc32`` is ``zlib.crc32(payload)`` and ``1 <= length < 2**24``. The payload is one record
as compact ASCII JSON (``allow_nan=True``): NaN and +-inf round-trip exactly, tuples come back
as lists, non-string dict keys as strings, and reading a file can never execute code. ASCII
JSON holds no zero byte, while a length field starts with one: after a damaged frame the
reader tries only offsets that hold a zero byte and resumes at the first whole frame whose
payload holds no zero byte and matches its CRC. A damaged stretch counts as one corrupt record.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ("HEADER", "MAX_RECORD_BYTES", "decode_record", "encode_frame", "iter_frames")

#: the largest payload of one record (the length's top byte is always zero)
MAX_RECORD_BYTES = (1 << 24) - 1
#: a frame's header: payload length and CRC-32, both unsigned 32-bit big-endian
HEADER = struct.Struct(">II")
_NONZERO = re.compile(rb"[^\x00]")
_encode = json.JSONEncoder(allow_nan=True, separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


def encode_frame(record: object) -> bytes:
    """
    The frame holding one record (JSON data: tuples are read back as lists).

    Raises:
        TypeError: the record holds something JSON cannot encode.
        ValueError: the encoded record is larger than ``MAX_RECORD_BYTES``.
    """
    payload = _encode(record).encode("ascii")
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_record(payload: bytes) -> object:
    """
    The record held by a frame's payload.

    Raises:
        ValueError: the payload is not ASCII JSON.
        RecursionError: the payload nests too deeply to decode.
    """
    return _decode(payload.decode("ascii"))


def iter_frames(data: bytes, pos: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(offset, payload)`` per whole frame and ``(offset, None)`` per damaged stretch."""
    while pos < len(data):
        end = _frame_end(data, pos)
        if end > 0:
            yield pos, data[pos + HEADER.size : end]
            pos = end
            continue
        yield pos, None
        pos = _resync(data, pos + 1)


def _resync(data: bytes, pos: int) -> int:
    """The offset of the next whole frame from ``pos`` on, else ``len(data)``."""
    while (zero := data.find(b"\x00", pos)) >= 0:
        nonzero = _NONZERO.search(data, zero)
        if nonzero is None:
            break
        # a frame starts with a zero byte and has a nonzero byte among the next three
        for start in range(max(zero, nonzero.start() - 3), nonzero.start()):
            if _frame_end(data, start) > 0:
                return start
        pos = nonzero.start() + 1
    return len(data)


def _frame_end(data: bytes, pos: int) -> int:
    """The end offset of a whole frame with a matching CRC at ``pos``, else -1."""
    if pos + HEADER.size > len(data):
        return -1
    length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if not 0 < length <= MAX_RECORD_BYTES or end > len(data):
        return -1
    if data.find(b"\x00", pos + HEADER.size, end) >= 0:  # cheap: rejects most garbage
        return -1
    return end if zlib.crc32(memoryview(data)[pos + HEADER.size : end]) == crc else -1
