"""The process message format and the in-memory exchange: headers checked field by field, bytes
counted per message, the wire dtype applied the same way in memory as between processes."""

from __future__ import annotations

import pytest
import torch

from d2ora.distributed import wire
from d2ora.engine.exchange import InMemoryExchange, Routes, wire_round_trip
from d2ora.topology import metropolis_hastings, ring


def header(**changes) -> wire.Header:
    fields = {"round": 3, "step": 1, "sender": 2, "receiver": 5, "length": 7, "dtype": torch.float32, **changes}
    return wire.Header(**fields)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_encode_decode_round_trip_is_exact(dtype: torch.dtype) -> None:
    payload = torch.randn(7, dtype=torch.float64).to(dtype)
    buffer = wire.encode(header(dtype=dtype), payload)
    assert buffer.dtype == torch.uint8 and buffer.numel() == wire.HEADER_BYTES + 7 * payload.element_size()
    assert buffer.numel() == wire.buffer_bytes(7, dtype)
    assert torch.equal(wire.decode(buffer, header(dtype=dtype)), payload)
    # By hand: the first header word is the magic, little-endian int64; the payload bytes follow.
    assert int.from_bytes(bytes(buffer[:8].tolist()), "little") == wire.MAGIC


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("round", 2, "round 3 \\(expected 2\\)"), ("step", 0, "step 1"), ("sender", 4, "sender 2"),
     ("receiver", 6, "receiver 5")],
)
def test_a_header_that_does_not_match_names_the_field(field: str, value: int, message: str) -> None:
    buffer = wire.encode(header(), torch.zeros(7))
    with pytest.raises(wire.WireError, match=message):
        wire.decode(buffer, header(**{field: value}))


def test_wrong_size_or_dtype_is_refused() -> None:
    buffer = wire.encode(header(), torch.zeros(7))
    with pytest.raises(wire.WireError, match="bytes"):
        wire.decode(buffer[:-4], header())
    with pytest.raises(wire.WireError, match="bytes"):
        wire.decode(buffer, header(dtype=torch.bfloat16))
    corrupted = buffer.clone()
    corrupted[0] ^= 0xFF
    with pytest.raises(wire.WireError, match="magic"):
        wire.decode(corrupted, header())
    with pytest.raises(wire.WireError, match="header says"):
        wire.encode(header(), torch.zeros(6))


def test_header_overhead_is_far_below_one_percent_of_an_adapter() -> None:
    minilm_r8_values = 361_000  # about one MiniLM DoRA r=8 adapter with its head
    assert wire.HEADER_BYTES / (4 * minilm_r8_values) < 1e-4


def test_in_memory_exchange_routes_and_counts_every_message() -> None:
    peers, numel = 5, 11
    routes = Routes(torch.as_tensor(metropolis_hastings(ring(peers)), dtype=torch.float32))
    outgoing = torch.randn(peers, numel)
    inbox = InMemoryExchange(routes, range(peers)).exchange(outgoing, 1, 0)
    assert set(inbox.messages) == {((i + d) % peers, i) for i in range(peers) for d in (-1, 1)}
    for (j, i), message in inbox.messages.items():
        assert torch.equal(message, outgoing[j])
    assert inbox.payload_bytes == {j: 2 * numel * 4 for j in range(peers)}  # two neighbours each, fp32
    half = InMemoryExchange(routes, range(peers), torch.bfloat16).exchange(outgoing, 1, 0)
    assert half.payload_bytes == {j: 2 * numel * 2 for j in range(peers)}
    assert torch.equal(half.messages[(1, 0)], outgoing[1].to(torch.bfloat16).float())
    assert torch.equal(wire_round_trip(outgoing[0], torch.float32), outgoing[0])
    with pytest.raises(ValueError, match="does not host"):
        InMemoryExchange(routes, range(3))
