"""The one message a link carries: a 40-byte header and the payload, as the body of one gRPC call.

Header (little-endian, ``struct`` format ``<4sIqqqQ``)::

    magic b"D2PL" | version u32 = 1 | sender i64 | round i64 | slot i64 | payload length u64

then ``payload length`` bytes. gRPC already frames, compresses (not used) and bounds the message,
so this is only the metadata a receiver needs to file a message: who says it sent it (checked
against the TLS certificate by the server), and the (round, slot) it belongs to. The length field
is redundant with gRPC's message length on purpose: a truncated or padded body is refused rather
than filed under the wrong size. Fixed integers only, nothing pickled, so a frame can never make
the receiver run code; the payload is opaque bytes (a signed envelope and adapter, for the round).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"D2PL"
VERSION = 1
HEADER = struct.Struct("<4sIqqqQ")
HEADER_BYTES = HEADER.size  # 40


class FrameError(ValueError):
    """A body that is not a well-formed frame; the message says what is wrong with it."""


@dataclass(frozen=True)
class Frame:
    sender: int
    round: int
    slot: int
    payload: bytes


def encode(frame: Frame) -> bytes:
    """Header then payload, one ``bytes`` for gRPC's identity serializer."""
    for field in ("sender", "round", "slot"):
        value = getattr(frame, field)
        if not 0 <= value < 2**63:
            raise FrameError(f"{field} {value} does not fit the frame (0 <= {field} < 2^63)")
    return HEADER.pack(MAGIC, VERSION, frame.sender, frame.round, frame.slot, len(frame.payload)) + bytes(frame.payload)


def decode(body: bytes, max_payload: int) -> Frame:
    """The frame in ``body``; FrameError naming the first thing wrong with it."""
    if len(body) < HEADER_BYTES:
        raise FrameError(f"a frame of {len(body)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, sender, round_, slot, length = HEADER.unpack_from(body)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} (expected {MAGIC!r}): not a d2ora link frame")
    if version != VERSION:
        raise FrameError(f"frame version {version}, this peer speaks version {VERSION}")
    if min(sender, round_, slot) < 0:
        raise FrameError(f"negative field in the header (sender {sender}, round {round_}, slot {slot})")
    if length != len(body) - HEADER_BYTES:
        raise FrameError(f"the header says {length} payload bytes, the frame carries {len(body) - HEADER_BYTES}")
    if length > max_payload:
        raise FrameError(f"a payload of {length} bytes exceeds the limit of {max_payload}")
    return Frame(sender, round_, slot, bytes(body[HEADER_BYTES:]))
