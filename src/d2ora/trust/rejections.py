"""Rejected messages counted per sender and check: the one summary both the run (summary.json's
``rejected_by_sender``, from its counts tensor) and the ledger audit (from Rejection records) give."""

from __future__ import annotations

from collections.abc import Iterable


def rejected_by_sender(counts: Iterable[tuple[int, str, int]]) -> dict[str, dict[str, int]]:
    """``(sender, check, count)`` triples -> ``{str(sender): {check: total}}``.

    Senders in numeric order, checks in the order first seen, zero counts left out (a sender appears
    only if something of it was rejected). The keys are strings because summary.json is JSON, whose
    object keys are strings: an int-keyed dict would read back different from what was written."""
    totals: dict[int, dict[str, int]] = {}
    for sender, check, count in counts:
        if count:
            per_check = totals.setdefault(int(sender), {})
            per_check[check] = per_check.get(check, 0) + int(count)
    return {str(sender): totals[sender] for sender in sorted(totals)}
