"""Personalization: which parts of its adapter a peer shares, and the exchange wrapper that sends
only those.

``share`` names what travels; everything else stays with the peer, never leaves it, and is never
mixed:

- ``all``: m, B, A and the head (plain decentralized training);
- ``direction``: B and A (the direction update) and the head; each peer keeps its own magnitudes m,
  so it can re-weight the shared directions for its own data;
- ``magnitude``: m and the head; each peer keeps its own B and A (the reverse split);
- ``lora_a``: A and the head (FedSA-LoRA, Guo et al., arXiv 2410.01463: A learns what is common,
  B what is client-specific); each peer keeps B and m.

The classification head (dense ``modules_to_save`` tensors) is shared in every mode: it is part of
the model the peers agree on, and a global model needs one head.

:class:`SharedPartsExchange` wraps any :class:`~d2ora.engine.exchange.Exchange` (in memory,
torch.distributed, the trust layer): a message carries the shared entries only (so the bytes
reported are what a peer really sends, and a signature covers exactly them), and the receiver
completes each neighbour's adapter with its own values for the parts it keeps, so every mixer
still sees whole adapters. After every mix the kept parts are written back unchanged
(:meth:`SharePolicy.keep_own`, called by :class:`d2ora.engine.round.Mixing`), so a linear mix of
identical values cannot drift them by rounding and a re-basing mixer cannot touch them.

:class:`SharePolicy` is the one place the mode is decided, once per run: its mask, the message
size, the exchange wrapper and the after-mix write-back.

Mixers that couple the parts are refused where a kept part would be meaningless (checked in the
config): ``dora_exact`` mixes the merged weight, m and B·A together; ``magnitude`` and ``lora_a``
keep B (and A) in the peer's own basis, so a mixer that re-bases the factors (DeCAF) would
re-express parts the peer keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from d2ora.engine.exchange import Attachments, Exchange, Inbox, Payloads
from d2ora.engine.layout import AdapterLayout

#: share mode -> the layout kinds that travel.
SHARED_KINDS: dict[str, frozenset[str]] = {
    "all": frozenset({"lora_A", "lora_B", "lora_magnitude_vector", "dense"}),
    "direction": frozenset({"lora_A", "lora_B", "dense"}),
    "magnitude": frozenset({"lora_magnitude_vector", "dense"}),
    "lora_a": frozenset({"lora_A", "dense"}),
}
SHARE_MODES = tuple(SHARED_KINDS)


def shared_mask(layout: AdapterLayout, share: str) -> torch.Tensor:
    """``(numel,)`` bool: the flat adapter's entries that travel under ``share``."""
    try:
        kinds = SHARED_KINDS[share]
    except KeyError:
        raise ValueError(f"unknown share {share!r}; choose one of {', '.join(SHARE_MODES)}") from None
    mask = torch.zeros(layout.numel, dtype=torch.bool)
    for entry in layout.entries:
        if entry.kind in kinds:
            mask[entry.offset : entry.offset + entry.numel] = True
    if not mask.any():
        raise ValueError(f"share {share!r} leaves nothing to send: the adapter has no {', '.join(sorted(kinds))}")
    return mask


class SharedPartsExchange:
    """Sends the shared entries of each adapter; hands back whole adapters, completed with the
    receiver's own kept parts."""

    def __init__(self, inner: Exchange, mask: torch.Tensor) -> None:
        self.inner = inner
        self.hosted: Sequence[int] = inner.hosted
        self.mask = mask
        self._row = {peer: k for k, peer in enumerate(self.hosted)}

    def exchange(self, outgoing: torch.Tensor, round_index: int, step: int, *,
                 attachments: Attachments | None = None, payloads: Payloads | None = None) -> Inbox:
        mask = self.mask.to(outgoing.device)
        packed = outgoing[:, mask]
        if payloads:  # a replacement payload of full size is cut to its shared entries
            payloads = {pair: p[mask.to(p.device)] if p.numel() == mask.numel() else p for pair, p in payloads.items()}
        inbox = self.inner.exchange(packed, round_index, step, attachments=attachments, payloads=payloads)
        for (sender, receiver), values in list(inbox.messages.items()):
            whole = outgoing[self._row[receiver]].clone()
            whole[mask] = values.to(device=whole.device, dtype=whole.dtype)
            inbox.messages[(sender, receiver)] = whole
        return inbox


class SharePolicy:
    """A run's share mode over one adapter layout, decided once: which entries travel, how many
    values a message holds, the exchange wrapper that sends them, and the write-back of the kept
    parts after every mix."""

    def __init__(self, layout: AdapterLayout, mode: str = "all") -> None:
        self.mode = mode
        #: (numel,) bool: the entries that travel (validates the mode).
        self.mask = shared_mask(layout, mode)
        #: Every part travels: no wrapper, nothing to write back (decided by the mode, as configured).
        self.shares_all = mode == "all"
        self.message_numel = int(self.mask.sum())
        self._kept: dict[torch.device, torch.Tensor] = {}

    def wrap(self, exchange: Exchange) -> Exchange:
        """``exchange`` sending only the shared entries (itself when everything is shared); the
        outermost wrapper, so signatures cover exactly what is sent."""
        return exchange if self.shares_all else SharedPartsExchange(exchange, self.mask)

    def keep_own(self, mixed: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """``mixed (h, numel)`` with the parts each peer keeps set back to ``own``, bit for bit,
        whatever the rule did (in place; returned for chaining)."""
        if self.shares_all:
            return mixed
        kept = self._kept.get(mixed.device)
        if kept is None:  # the mask on this device, made once
            kept = self._kept[mixed.device] = ~self.mask.to(mixed.device)
        mixed[:, kept] = own[:, kept]
        return mixed
