"""Moving messages between processes with torch.distributed point-to-point operations.

One flat buffer per (sender, receiver) message (:mod:`d2ora.distributed.wire`), all of a gossip
step posted at once with ``batch_isend_irecv`` (so no ordering of sends and receives can
deadlock), in the same sorted (sender, receiver) order on both sides (NCCL matches by order, gloo
by tag; both hold). Messages between peers of the same process never leave memory. A receive that
does not complete within the job's timeout names the silent peer and the round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from d2ora.distributed import wire
from d2ora.distributed.group import DIST_FAILURES, Group, ProcessLostError, explain_loss, guarded, symptom
from d2ora.engine.exchange import Attachments, Inbox, Payloads, Routes, local_inbox, wire_itemsize


class PeerSilentError(ProcessLostError):
    """A neighbour's message did not arrive in time (or its process is gone)."""


def _timed_out(exc: BaseException) -> bool:
    # Wording only (what the line says happened); which errors are caught never depends on it.
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def _wait(works: Sequence[dist.Work], describe: Callable[[int], str], group: Group, where: int | str) -> None:
    """Wait for every operation; the first that fails or times out stops the job with one line."""
    for index, work in enumerate(works):
        try:
            work.wait(group.timeout)
        except DIST_FAILURES as exc:
            if _timed_out(exc):
                mine = f"{describe(index)} within {group.timeout.total_seconds():g} s"
            else:  # a closed connection: the process at the other end is most likely gone
                mine = f"{describe(index)}: {symptom(exc)}"
            # Our wait may be a symptom (a neighbour stuck on a third process): name the silent one.
            raise PeerSilentError(explain_loss(group, mine, where)) from None


class DistributedExchange:
    """The :class:`~d2ora.engine.exchange.Exchange` of one process in a torchrun job."""

    def __init__(self, routes: Routes, hosted: Sequence[int], owner: Callable[[int], int], group: Group,
                 numel: int, layout_dtype: torch.dtype, wire_dtype: torch.dtype | None = None,
                 attachment_bytes: int = 0) -> None:
        self.routes = routes
        self.hosted = list(hosted)
        self.owner = owner
        self.group = group
        self.numel = numel
        self.layout_dtype = layout_dtype
        self.wire_dtype = wire_dtype or layout_dtype
        #: Bytes every message carries after its payload (the trust layer's envelope; agreed at start).
        self.attachment_bytes = attachment_bytes
        hosted_set = set(self.hosted)
        #: (sender, receiver) pairs crossing process boundaries, sorted; and local ones.
        self.outbound = sorted((j, i) for j in self.hosted for i in routes.out_neighbours(j) if i not in hosted_set)
        self.inbound = sorted((j, i) for i in self.hosted for j in routes.in_neighbours(i) if j not in hosted_set)
        self.local_pairs = [(j, i) for i in self.hosted for j in routes.in_neighbours(i) if j in hosted_set]
        self.buffer_device = group.device if group.backend == "nccl" else torch.device("cpu")

    def _tag(self, sender: int, receiver: int) -> int:
        return 1 + sender * self.routes.peers + receiver

    def _header(self, sender: int, receiver: int, round_index: int, step: int) -> wire.Header:
        return wire.Header(round_index, step, sender, receiver, self.numel, self.wire_dtype)

    def _fixed_payload(self, payload: torch.Tensor) -> torch.Tensor:
        """A replacement payload cut or zero-padded to the agreed length: buffers have a fixed size,
        so a wrong-length message shows up to the receiver through its (signed) envelope instead."""
        payload = payload.reshape(-1)
        if payload.numel() >= self.numel:
            return payload[: self.numel]
        return torch.cat([payload, payload.new_zeros(self.numel - payload.numel())])

    def _attachment(self, attachments: Attachments | None, pair: tuple[int, int]) -> torch.Tensor:
        data = (attachments or {}).get(pair, b"")
        if len(data) > self.attachment_bytes:
            raise ValueError(f"attachment of {len(data)} bytes, the job carries {self.attachment_bytes} per message")
        data = data + bytes(self.attachment_bytes - len(data))  # a missing attachment arrives as zeros
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)

    def exchange(self, outgoing: torch.Tensor, round_index: int, step: int, *,
                 attachments: Attachments | None = None, payloads: Payloads | None = None) -> Inbox:
        row = {peer: k for k, peer in enumerate(self.hosted)}
        inbox = local_inbox(outgoing, self.hosted, self.local_pairs, self.wire_dtype, attachments, payloads)
        size = self.numel * wire_itemsize(self.layout_dtype, self.wire_dtype)
        extra = self.attachment_bytes
        ops: list[dist.P2POp] = []
        sends = []
        for j, i in self.outbound:
            source = payloads[(j, i)] if payloads and (j, i) in payloads else outgoing[row[j]]
            payload = self._fixed_payload(source).to(device=self.buffer_device, dtype=self.wire_dtype)
            buffer = wire.encode(self._header(j, i, round_index, step), payload)
            if extra:
                buffer = torch.cat([buffer, self._attachment(attachments, (j, i)).to(buffer.device)])
            sends.append(buffer)  # kept alive until the send completes
            ops.append(dist.P2POp(dist.isend, buffer, self.owner(i), tag=self._tag(j, i)))
            inbox.payload_bytes[j] += size
            inbox.wire_bytes += buffer.numel()
        receives = []
        for j, i in self.inbound:
            length = wire.buffer_bytes(self.numel, self.wire_dtype) + extra
            buffer = torch.empty(length, dtype=torch.uint8, device=self.buffer_device)
            receives.append(((j, i), buffer))
            ops.append(dist.P2POp(dist.irecv, buffer, self.owner(j), tag=self._tag(j, i)))
        if ops:
            # Posting can fail too (gloo refuses a send on a connection a dead process closed).
            with guarded(self.group, round_index, f"posting gossip step {step}'s messages"):
                works = dist.batch_isend_irecv(ops)
            pairs = self.outbound + self.inbound
            n_out = len(self.outbound)

            def describe(index: int) -> str:
                j, i = pairs[index]
                if index < n_out:
                    return f"peer {i} (process {self.owner(i)}) did not take peer {j}'s round {round_index} message (gossip step {step})"
                return f"peer {j} (process {self.owner(j)}) sent peer {i} nothing for round {round_index} (gossip step {step})"

            _wait(works, describe, self.group, round_index)
        for (j, i), buffer in receives:
            body = buffer[: buffer.numel() - extra] if extra else buffer
            try:
                payload = wire.decode(body, self._header(j, i, round_index, step))
            except wire.WireError as exc:
                if not extra:
                    raise
                # Under the trust layer a bad frame is one Byzantine message, not a reason to stop.
                inbox.bad_frames[(j, i)] = str(exc)
                continue
            inbox.messages[(j, i)] = payload.to(device=outgoing.device, dtype=self.layout_dtype)
            if extra:
                inbox.attachments[(j, i)] = buffer[buffer.numel() - extra :].cpu().numpy().tobytes()
        return inbox


class DistributedCollector:
    """Brings per-peer values and adapters to process 0 (which hosts peer 0 and the monitor)."""

    VALUES, ADAPTERS = 1, 2

    def __init__(self, group: Group, blocks: Sequence[range], peers: int, rounds: int | None = None) -> None:
        self.group = group
        self.blocks = list(blocks)
        self.peers = peers
        #: The run's last round: gathers numbered past it collect the final results (messages say so).
        self.rounds = rounds
        self.is_monitor = group.is_root
        self.buffer_device = group.device if group.backend == "nccl" else torch.device("cpu")

    def _tag(self, kind: int, rank: int) -> int:
        # Above every exchange tag (1 + P·P).
        return 2 + self.peers * self.peers + kind * self.group.world_size + rank

    def _where(self, round_index: int) -> int | str:
        if self.rounds is not None and round_index > self.rounds:
            return f"while collecting the final results (after round {self.rounds})"
        return round_index

    def _gather(self, local: torch.Tensor, kind: int, round_index: int) -> torch.Tensor | None:
        group = self.group
        local = local.to(self.buffer_device).contiguous()
        width, dtype = local.shape[1], local.dtype
        where = self._where(round_index)
        results = f"round {round_index}'s results" if where == round_index else "the final results"
        if not group.is_root:
            header = wire.Header(round_index, kind, group.rank, 0, local.numel(), dtype)
            message = wire.encode(header, local.reshape(-1))
            with guarded(group, where, "sending results to process 0"):
                work = dist.isend(message, 0, tag=self._tag(kind, group.rank))
            _wait([work], lambda _: f"process 0 did not collect {results} from process {group.rank}", group, where)
            return None
        parts = [local]
        works, buffers = [], []
        for rank in range(1, group.world_size):
            n = len(self.blocks[rank]) * width
            buffer = torch.empty(wire.buffer_bytes(n, dtype), dtype=torch.uint8, device=self.buffer_device)
            buffers.append((rank, n, buffer))
            with guarded(group, where, f"receiving process {rank}'s results"):
                works.append(dist.irecv(buffer, rank, tag=self._tag(kind, rank)))
        blocks = self.blocks

        def describe(index: int) -> str:
            rank = buffers[index][0]
            return f"peers {blocks[rank].start}..{blocks[rank].stop - 1} (process {rank}) sent none of {results}"

        _wait(works, describe, group, where)
        for rank, n, buffer in buffers:
            payload = wire.decode(buffer, wire.Header(round_index, kind, rank, 0, n, dtype))
            parts.append(payload.reshape(-1, width))
        return torch.cat(parts).to(local.device)

    def gather_values(self, values: torch.Tensor, round_index: int) -> torch.Tensor | None:
        return self._gather(values.double(), self.VALUES, round_index)

    def gather_adapters(self, flat: torch.Tensor, round_index: int) -> torch.Tensor | None:
        gathered = self._gather(flat, self.ADAPTERS, round_index)
        return None if gathered is None else gathered.to(flat.device)
