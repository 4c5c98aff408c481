"""The message format between processes: a fixed header and the payload, in one flat byte buffer.

Header: eight little-endian int64 words, ``MAGIC, VERSION, round, step, sender, receiver, length,
dtype code`` (64 bytes; a MiniLM r=8 adapter is 1.4 MB, so 0.005% overhead). The payload's bytes
follow. Both sides know the layout (agreed at start), so the receiver pre-allocates the exact
buffer and checks every header field before using the payload. Raw bytes and fixed integers only:
nothing is pickled, so a message can never make the receiver run code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAGIC = 0x44324F5241  # "D2ORA"
VERSION = 1
HEADER_WORDS = 8
HEADER_BYTES = HEADER_WORDS * 8
#: dtype codes on the wire (never a pickled dtype object).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4, torch.int64: 5,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class WireError(RuntimeError):
    """A message whose header does not match what the receiver expects."""


@dataclass(frozen=True)
class Header:
    round: int
    step: int
    sender: int
    receiver: int
    length: int  # payload elements
    dtype: torch.dtype

    def words(self) -> torch.Tensor:
        code = DTYPE_CODES.get(self.dtype)
        if code is None:
            raise WireError(f"dtype {self.dtype} cannot travel on the wire")
        return torch.tensor([MAGIC, VERSION, self.round, self.step, self.sender, self.receiver, self.length, code],
                            dtype=torch.int64)


def buffer_bytes(length: int, dtype: torch.dtype) -> int:
    return HEADER_BYTES + length * torch.empty(0, dtype=dtype).element_size()


def encode(header: Header, payload: torch.Tensor) -> torch.Tensor:
    """One contiguous uint8 buffer: header, then the payload (``header.length`` elements of ``header.dtype``)."""
    if payload.dtype != header.dtype or payload.numel() != header.length:
        raise WireError(f"payload is {payload.numel()} x {payload.dtype}, the header says {header.length} x {header.dtype}")
    words = header.words().to(payload.device)
    return torch.cat([words.view(torch.uint8), payload.contiguous().reshape(-1).view(torch.uint8)])


def decode(buffer: torch.Tensor, expected: Header) -> torch.Tensor:
    """The payload of ``buffer`` after checking every header field against ``expected``."""
    if buffer.dtype != torch.uint8 or buffer.numel() != buffer_bytes(expected.length, expected.dtype):
        raise WireError(f"message from peer {expected.sender} to {expected.receiver} has {buffer.numel()} bytes, "
                        f"expected {buffer_bytes(expected.length, expected.dtype)}")
    words = buffer[:HEADER_BYTES].view(torch.int64).tolist()
    want = expected.words().tolist()
    names = ("magic", "version", "round", "step", "sender", "receiver", "length", "dtype")
    wrong = [f"{n} {got} (expected {exp})" for n, got, exp in zip(names, words, want) if got != exp]
    if wrong:
        raise WireError(f"message for peer {expected.receiver} claiming to be from peer {expected.sender} has "
                        + ", ".join(wrong))
    return buffer[HEADER_BYTES:].view(expected.dtype)
