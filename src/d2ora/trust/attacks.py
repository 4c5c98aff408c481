"""Byzantine peers: what a malicious peer sends instead of its adapter, to test the defences.

Chosen per run (``attack: alie``, ``byzantine: [2, 5]``); every listed peer attacks. Byzantine
peers train and mix like everyone else (so they hold a plausible adapter) but send crafted
messages. They are peers like any other, so they know what a peer can know and no more: their own
adapter x and the messages they accepted in their previous gossip step (from their in-neighbours;
on a symmetric graph these are the peers they attack). That makes the attacks identical in the
simulator and under torchrun, and weaker than the omniscient attacker of the papers (which sees the
target's honest neighbours this very step): results here are an upper bound on what a defence
achieves against that stronger adversary. K below is that knowledge, {x} ∪ received; μ and σ its
coordinate-wise mean and standard deviation; ε the ``attack_scale``.

Model poisoning (the message is validly signed; only robust mixing can help):
  - ``sign_flip``   μ − ε (x − μ): its own progress reversed about the neighbourhood (ε = 1).
  - ``gaussian``    x + N(0, (ε · rms(x))²) per coordinate (ε = 1).
  - ``alie``        μ − z σ, z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f for a receiver with n peers in its
                    closed neighbourhood, f of them Byzantine ("A Little Is Enough", Baruch, Baruch
                    and Goldberg, NeurIPS 2019): close enough to the honest spread to pass outlier
                    filters, consistently on one side.
  - ``ipm``         −ε μ (inner product manipulation, Xie, Koyejo and Gupta, UAI 2020; ε = 0.5): pulls
                    the mix against the honest direction.
  - ``dissensus``   x_i − ε (μ − x_i) for receiver i, x_i its last message (He, Karimireddy and Jaggi,
                    arXiv 2202.01545, made for gossip; ε = 1.5): pushes each receiver away from its
                    neighbours, so that the honest peers drift apart instead of agreeing.
  - ``label_flip``  data poisoning: the peer trains on labels y → C − 1 − y and sends honestly (sft data whose
                    answers are class words: each answer replaced by class C − 1 − y's word).
Protocol attacks (each message must be rejected by :mod:`d2ora.trust.checks`):
  - ``forged_signature``  signed with a key that is not the sender's.
  - ``missing_signature`` no envelope at all.
  - ``replay``            the message it sent one gossip step earlier, again.
  - ``nan``               a validly signed payload with NaN values.
  - ``wrong_shape``       a validly signed payload one value short.
  - ``equivocation``      a different validly signed payload for each receiver in the same slot: each
                          passes the receiver's checks alone; ``d2ora ledger verify`` names the sender
                          from two receivers' ledgers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy.stats import norm

from d2ora.engine.exchange import Routes
from d2ora.engine.host import hash_seed
from d2ora.trust.envelope import Envelope

MODEL_ATTACKS = ("sign_flip", "gaussian", "alie", "ipm", "dissensus")
DATA_ATTACKS = ("label_flip",)
PROTOCOL_ATTACKS = ("forged_signature", "missing_signature", "replay", "nan", "wrong_shape", "equivocation")
ATTACKS = MODEL_ATTACKS + DATA_ATTACKS + PROTOCOL_ATTACKS
#: Protocol attacks whose every message a receiver must reject on its own (equivocation needs the
#: ledgers of two receivers).
REJECTED_ONLINE = frozenset(PROTOCOL_ATTACKS) - {"equivocation"}
DEFAULT_SCALE = {"sign_flip": 1.0, "gaussian": 1.0, "ipm": 0.5, "dissensus": 1.5, "equivocation": 0.01}


def alie_z(neighbourhood: int, byzantine: int) -> float:
    """Baruch et al.'s z_max for n = ``neighbourhood`` participants, f = ``byzantine`` of them: the
    largest shift (in standard deviations) that still leaves the attacker inside the majority."""
    n = neighbourhood
    s = math.floor(n / 2 + 1) - byzantine
    quantile = (n - s) / n
    if not 0 < quantile < 1:
        return 1.0  # too few participants for the formula: one standard deviation
    return float(norm.ppf(quantile))


def flip_labels(labels: Iterable[int], classes: int) -> list[int]:
    """The label-flip attack's training labels: y -> C - 1 - y."""
    return [classes - 1 - int(y) for y in labels]


@dataclass
class Adversary:
    """The Byzantine peers a process hosts and how they attack."""

    attack: str
    byzantine: frozenset[int]
    routes: Routes
    seed: int = 0
    scale: float | None = None
    #: Byzantine peer -> {sender: the payload it accepted from sender last gossip step}.
    knowledge: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    #: (sender, receiver) -> (envelope bytes, payload) it sent last step (for replay).
    last_sent: dict[tuple[int, int], tuple[bytes, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; valid: {', '.join(ATTACKS)}")
        self.epsilon = DEFAULT_SCALE.get(self.attack, 1.0) if self.scale is None else self.scale
        self._forger = Ed25519PrivateKey.generate()  # a key no roster holds

    def attacks(self, sender: int) -> bool:
        return sender in self.byzantine and self.attack not in DATA_ATTACKS

    # -------------------------------------------------------------------------- model poisoning
    def _known(self, sender: int, own: torch.Tensor) -> torch.Tensor:
        received = [p.to(own.device, own.dtype) for _, p in sorted(self.knowledge.get(sender, {}).items())]
        return torch.stack([own, *received])

    def _noise(self, like: torch.Tensor, *key: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(hash_seed(self.seed, *key))
        return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)

    def _crafted(self, sender: int, receiver: int, own: torch.Tensor, round_index: int, step: int) -> torch.Tensor | None:
        attack, eps = self.attack, self.epsilon
        known = self._known(sender, own).double()
        mean = known.mean(0)
        x = own.double()
        if attack == "sign_flip":
            out = mean - eps * (x - mean)
        elif attack == "gaussian":
            rms = x.square().mean().sqrt()
            out = x + eps * rms * self._noise(own, 1, round_index, step, sender).double()
        elif attack == "alie":
            hood = [receiver, *self.routes.in_neighbours(receiver)]
            z = alie_z(len(hood), sum(1 for j in hood if j in self.byzantine))
            std = known.std(0, unbiased=False)
            out = mean - z * std
        elif attack == "ipm":
            out = -eps * mean
        elif attack == "dissensus":
            target = self.knowledge.get(sender, {}).get(receiver)
            centre = x if target is None else target.double()
            out = centre - eps * (mean - centre)
        elif attack == "nan":
            out = x.clone()
            out[:: max(1, x.numel() // 16)] = math.nan
        elif attack == "wrong_shape":
            return own[:-1].clone()
        elif attack == "equivocation":
            rms = x.square().mean().sqrt()
            out = x + eps * rms * self._noise(own, 2, round_index, step, sender, receiver).double()
        else:
            return None
        return out.to(own.dtype)

    def payloads(self, outgoing: Mapping[int, torch.Tensor], round_index: int, step: int) -> dict[tuple[int, int], torch.Tensor]:
        """What each hosted Byzantine sender sends each out-neighbour instead of its adapter."""
        crafted: dict[tuple[int, int], torch.Tensor] = {}
        for sender, own in outgoing.items():
            if not self.attacks(sender):
                continue
            for receiver in self.routes.out_neighbours(sender):
                payload = self._crafted(sender, receiver, own, round_index, step)
                if payload is not None:
                    crafted[(sender, receiver)] = payload
        return crafted

    # ------------------------------------------------------------------------- protocol attacks
    def tamper(self, pair: tuple[int, int], envelope: Envelope, payload: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """The attachment and payload a Byzantine sender actually puts on the link ``pair``."""
        honest = envelope.to_bytes()
        if not self.attacks(pair[0]):
            return honest, payload
        if self.attack == "forged_signature":
            return envelope.header.pack() + self._forger.sign(envelope.header.pack()), payload
        if self.attack == "missing_signature":
            return b"", payload
        if self.attack == "replay":
            previous = self.last_sent.get(pair)
            self.last_sent[pair] = (honest, payload)
            if previous is not None:
                return previous
        return honest, payload

    def observe(self, receiver: int, accepted: Mapping[int, torch.Tensor]) -> None:
        """What Byzantine ``receiver`` accepted this step (its knowledge for the next one)."""
        if receiver in self.byzantine:
            self.knowledge[receiver] = {j: p.detach().clone() for j, p in accepted.items()}

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What the hosted Byzantine peers learnt in the last gossip step, which the next round's
        crafted and replayed messages depend on (d2ora.engine.state's convention: tensors, or JSON)."""
        state: dict[str, Any] = {}
        for receiver, known in self.knowledge.items():
            state[f"knowledge.{receiver}"] = sorted(known)  # its senders, also when it accepted none
            state.update({f"knowledge.{receiver}.{sender}": payload for sender, payload in known.items()})
        for (sender, receiver), (envelope, payload) in self.last_sent.items():
            state[f"last_sent.{sender}.{receiver}.envelope"] = (
                torch.frombuffer(bytearray(envelope), dtype=torch.uint8) if envelope else torch.zeros(0, dtype=torch.uint8))
            state[f"last_sent.{sender}.{receiver}.payload"] = payload
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        knowledge: dict[int, dict[int, torch.Tensor]] = {}
        last_sent: dict[tuple[int, int], tuple[bytes, torch.Tensor]] = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "knowledge" and len(parts) == 2:
                receiver = int(parts[1])
                knowledge[receiver] = {int(j): state[f"knowledge.{receiver}.{j}"].clone() for j in value}
            elif parts[0] == "last_sent" and parts[3] == "envelope":
                sender, receiver = int(parts[1]), int(parts[2])
                last_sent[(sender, receiver)] = (value.numpy().tobytes(), state[f"last_sent.{sender}.{receiver}.payload"].clone())
        self.knowledge, self.last_sent = knowledge, last_sent

