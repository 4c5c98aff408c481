"""Where corrections plug into a round: the seams of :func:`d2ora.engine.round.run_round`.

A round is: the local steps, ``mixing_steps`` gossip steps (exchange, mix), and what follows the
mix. A method that changes the algorithm without changing how adapters are mixed (FedProx, QGM,
K-GT, the AdamW moment reset after a re-basing mixer) is a :class:`RoundHook`; ``run_round`` calls
every hook of the plan at the same points, in the plan's order:

1. :meth:`~RoundHook.begin_round` before the local steps (e.g. FedProx's anchor x_r);
2. :meth:`~RoundHook.extra_payloads` after them: ``(h, numel)`` tensors that travel as further
   messages in every gossip step, after the model's, and are mixed *linearly* with the same held
   weights and share mask (K-GT's local update Δ). Payload e of a plan with M gossip steps travels
   in message slot ``(1 + e)·M + step`` (K-GT's Δ: ``M + step``), which signatures and ledgers name;
3. :meth:`~RoundHook.after_mix` once the gossip steps are done, with the hook's own payloads as
   sent and as mixed (QGM's momentum, K-GT's tracking update, the moment reset).

A round without communication (``mixing_steps == 0``) calls only :meth:`begin_round`.

What a hook does *inside* each local step (a gradient term, a parameter shift) it does through
the trainer's step hooks (:class:`d2ora.engine.local_steps.StepCorrection`), passed to the trainer
when it is built. State a hook keeps across rounds goes through ``state_dict`` /
``load_state_dict`` (:mod:`d2ora.engine.state`) and the Checkpointer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RoundHook:
    """A no-op at every seam; a correction overrides what it needs."""

    def begin_round(self) -> None:
        """Before the round's local steps."""

    def extra_payloads(self) -> list[torch.Tensor]:
        """After the local steps: ``(h, numel)`` tensors to send and mix linearly each gossip step."""
        return []

    def after_mix(self, sent: Sequence[torch.Tensor], mixed: Sequence[torch.Tensor]) -> None:
        """After the last gossip step: this hook's extra payloads as sent and as mixed."""


def extra_slot(mixing_steps: int, payload: int, step: int) -> int:
    """The message slot of extra payload ``payload`` in gossip step ``step`` (the model's are 0..M-1)."""
    return (1 + payload) * mixing_steps + step
