"""The trust layer's message checks: every protocol attack rejected with its reason, honest messages
accepted, and a rejected message leaving no trace in the receiver's mix."""

from __future__ import annotations

import math

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from d2ora.engine.exchange import InMemoryExchange, Inbox, Routes
from d2ora.mixers.graph import degree_groups
from d2ora.engine.round import held_weights
from d2ora.topology import build_topology, mixing_matrix
from d2ora.trust.attacks import REJECTED_ONLINE, Adversary, alie_z
from d2ora.trust.checks import MessageChecker
from d2ora.trust.envelope import ENVELOPE_BYTES, NO_HEAD, EnvelopeHeader, parse, payload_digest, seal
from d2ora.trust.identity import Member, Roster
from d2ora.trust.signed_exchange import SignedExchange

PEERS, NUMEL = 6, 40
RUN = bytes(range(32))


def ring_routes(peers: int = PEERS) -> Routes:
    return Routes(torch.as_tensor(mixing_matrix(build_topology("ring", peers), "metropolis_hastings")))


def make(peers: int = PEERS, *, attack: str | None = None, byzantine: tuple[int, ...] = (), wire: torch.dtype = torch.float32,
         max_update_norm: float | None = None, seed: int = 0):
    routes = ring_routes(peers)
    keys = {p: Ed25519PrivateKey.generate() for p in range(peers)}
    roster = Roster({p: Member(p, k.public_key()) for p, k in keys.items()})
    checker = MessageChecker(roster, routes, RUN, NUMEL, wire, max_update_norm)
    adversary = None if attack is None else Adversary(attack, frozenset(byzantine), routes, seed=seed)
    inner = InMemoryExchange(routes, range(peers), None if wire == torch.float32 else wire)
    exchange = SignedExchange(inner, routes=routes, keys=keys, checker=checker, run_id=RUN, wire_dtype=wire,
                              ledger_head=lambda peer: NO_HEAD, adversary=adversary)
    return exchange, keys, roster, routes


def adapters(peers: int = PEERS, seed: int = 0) -> torch.Tensor:
    return torch.randn(peers, NUMEL, generator=torch.Generator().manual_seed(seed))


def test_honest_round_accepts_every_message_unchanged() -> None:
    exchange, *_ , routes = make()
    outgoing = adapters()
    inbox = exchange.exchange(outgoing, 1, 0)
    expected = {(j, i) for i in range(PEERS) for j in routes.in_neighbours(i)}
    assert set(inbox.messages) == expected
    for (j, _), payload in inbox.messages.items():
        assert torch.equal(payload, outgoing[j])
    record = exchange.take_round()
    assert not record.rejected
    assert sum(len(v) for v in record.accepted.values()) == len(expected)
    # each sender's record is the digest of its adapter's bytes
    assert record.sent[3] == [(0, payload_digest(outgoing[3]))]
    # the accepted envelopes are the signed headers: verify one by hand
    envelope = parse(record.accepted[0][0])
    assert len(record.accepted[0][0]) == ENVELOPE_BYTES
    assert envelope.header.receiver == 0 and envelope.header.round == 1
    assert envelope.signed_by(exchange.keys[envelope.header.sender].public_key())


@pytest.mark.parametrize("attack, check", [
    ("forged_signature", "signature"), ("missing_signature", "envelope"), ("nan", "nonfinite"),
    ("wrong_shape", "shape"),
])
def test_protocol_attacks_are_rejected_with_their_reason(attack: str, check: str) -> None:
    exchange, *_ , routes = make(attack=attack, byzantine=(2,))
    outgoing = adapters()
    inbox = exchange.exchange(outgoing, 1, 0)
    record = exchange.take_round()
    victims = routes.out_neighbours(2)
    for receiver in victims:
        assert (2, receiver) not in inbox.messages
        [verdict] = record.rejected[receiver]
        assert verdict.check == check and verdict.sender == 2
    # everything else got through
    assert sum(len(v) for v in record.rejected.values()) == len(victims)
    assert len(inbox.messages) == sum(len(routes.in_neighbours(i)) for i in range(PEERS)) - len(victims)


def test_replay_of_an_old_message_is_rejected_after_the_first_step() -> None:
    exchange, *_ , routes = make(attack="replay", byzantine=(4,))
    first = exchange.exchange(adapters(seed=1), 1, 0)
    assert all((4, i) in first.messages for i in routes.out_neighbours(4))  # nothing to replay yet: honest
    exchange.take_round()
    second = exchange.exchange(adapters(seed=2), 2, 0)
    record = exchange.take_round()
    for receiver in routes.out_neighbours(4):
        assert (4, receiver) not in second.messages
        assert [v.check for v in record.rejected[receiver]] == ["replay"]


def test_every_online_protocol_attack_has_a_test() -> None:
    covered = {"forged_signature", "missing_signature", "nan", "wrong_shape", "replay"}
    assert covered == set(REJECTED_ONLINE)


def checker_and_envelope(**header_changes):
    routes = ring_routes()
    keys = {p: Ed25519PrivateKey.generate() for p in range(PEERS)}
    roster = Roster({p: Member(p, k.public_key()) for p, k in keys.items()})
    checker = MessageChecker(roster, routes, RUN, NUMEL, torch.float32, max_update_norm=2.0)
    payload = torch.randn(NUMEL)
    fields = dict(run_id=RUN, round=3, step=1, sender=1, receiver=0, numel=NUMEL, dtype=torch.float32,
                  payload_sha256=payload_digest(payload), ledger_head=NO_HEAD)
    fields.update(header_changes)
    signer = keys.get(fields["sender"], Ed25519PrivateKey.generate())
    envelope = seal(EnvelopeHeader(**fields), signer)
    checker.start_slot(3, 1)
    return checker, envelope, payload, keys


@pytest.mark.parametrize("changes, check", [
    ({"sender": 99}, "roster"),
    ({"round": 2}, "replay"),
    ({"step": 0}, "replay"),
    ({"round": 4}, "future"),
    ({"receiver": 2}, "route"),
    ({"sender": 3}, "route"),  # on the roster, signed by itself, but not a neighbour of 0 on a ring of 6
    ({"run_id": bytes(32)}, "run"),
    ({"numel": NUMEL + 1}, "shape"),
    ({"dtype": torch.bfloat16}, "shape"),
    ({"payload_sha256": bytes(32)}, "digest"),
])
def test_each_header_check(changes: dict, check: str) -> None:
    checker, envelope, payload, _ = checker_and_envelope(**changes)
    verdict = checker.check(1, 0, envelope.to_bytes(), payload, torch.zeros(NUMEL) + 1)
    assert verdict.check == check, verdict.detail


def test_duplicate_slot_truncated_oversized_inf_and_norm() -> None:
    checker, envelope, payload, _ = checker_and_envelope()
    own = payload + 0.01
    assert checker.check(1, 0, envelope.to_bytes(), payload, own).accepted
    assert checker.check(1, 0, envelope.to_bytes(), payload, own).check == "duplicate"
    checker, envelope, payload, _ = checker_and_envelope()
    assert checker.check(1, 0, envelope.to_bytes(), payload[:-1], own).check == "shape"
    assert checker.check(1, 0, envelope.to_bytes(), torch.cat([payload, payload[:1]]), own).check == "shape"
    assert checker.check(1, 0, envelope.to_bytes()[:-1], payload, own).check == "envelope"  # truncated envelope
    bad = payload.clone()
    bad[3] = math.inf
    checker, envelope, _, _ = checker_and_envelope(payload_sha256=payload_digest(bad))
    assert checker.check(1, 0, envelope.to_bytes(), bad, own).check == "nonfinite"
    far = payload * 100
    checker, envelope, _, _ = checker_and_envelope(payload_sha256=payload_digest(far))
    assert checker.check(1, 0, envelope.to_bytes(), far, payload).check == "norm"
    assert checker.check(1, 0, None, far, payload).check == "envelope"
    assert checker.check(1, 0, b"", None, payload, bad_frame="bad magic").check == "frame"


def test_a_forwarded_copy_counts_for_its_signer_once() -> None:
    """Peer 1 forwards peer 5's validly signed message to 0 on its own link: accepted as 5's, and 5's
    own copy is then a duplicate; 1 is simply missing from 0's mix."""
    checker, envelope, payload, _ = checker_and_envelope(sender=5)
    own = payload.clone()
    forwarded = checker.check(1, 0, envelope.to_bytes(), payload, own)
    assert forwarded.accepted and forwarded.envelope.header.sender == 5
    assert checker.check(5, 0, envelope.to_bytes(), payload, own).check == "duplicate"


def test_bf16_wire_digests_match_on_both_sides() -> None:
    exchange, *_ = make(wire=torch.bfloat16)
    inbox = exchange.exchange(adapters(), 1, 0)
    assert not exchange.take_round().rejected and inbox.messages


def test_rejected_message_leaves_no_trace_in_the_mix() -> None:
    """Receiver 3 with neighbour 2 rejected mixes exactly {2 excluded, weights renormalised}."""
    weights = ring_routes().weights
    inbox = Inbox(messages={(j, i): torch.zeros(1) for i in range(PEERS) for j in ring_routes().in_neighbours(i)})
    del inbox.messages[(2, 3)]
    held = degree_groups(weights, range(PEERS), holds=lambda j, i: (j, i) in inbox.messages)
    groups = {i: hood for members, hoods in held for i, hood in zip(members, hoods)}
    assert groups[3] == [3, 4] and groups[0] == [0, 1, 5]
    kept = held_weights(weights, 3, groups[3])
    assert torch.allclose(kept, torch.tensor([0.5, 0.5], dtype=kept.dtype))
    assert torch.equal(held_weights(weights, 0, groups[0]), weights[0, [0, 1, 5]])  # nothing missing: untouched


def test_model_attacks_are_signed_and_accepted_but_crafted() -> None:
    exchange, *_ , routes = make(attack="ipm", byzantine=(1,))
    outgoing = adapters()
    inbox = exchange.exchange(outgoing, 1, 0)
    assert not exchange.take_round().rejected
    for receiver in routes.out_neighbours(1):
        assert torch.allclose(inbox.messages[(1, receiver)], -0.5 * outgoing[1])  # no knowledge yet: μ = x


def test_dissensus_pushes_each_receiver_away_from_the_attackers_view() -> None:
    exchange, *_ , routes = make(attack="dissensus", byzantine=(1,))
    first = adapters(seed=3)
    exchange.exchange(first, 1, 0)
    second = adapters(seed=4)
    inbox = exchange.exchange(second, 1, 1)
    known = torch.stack([second[1], first[0], first[2]]).double()  # own now + what 1 accepted at step 0
    mean = known.mean(0)
    for receiver in (0, 2):
        target = first[receiver].double()
        assert torch.allclose(inbox.messages[(1, receiver)].double(), target - 1.5 * (mean - target), atol=1e-6)


def test_equivocation_passes_each_receiver_but_differs_between_them() -> None:
    exchange, *_ , routes = make(attack="equivocation", byzantine=(0,))
    inbox = exchange.exchange(adapters(), 1, 0)
    record = exchange.take_round()
    assert not record.rejected
    a, b = routes.out_neighbours(0)
    digests = {parse(e).header.payload_sha256 for r in (a, b) for e in record.accepted[r] if parse(e).header.sender == 0}
    assert len(digests) == 2 and not torch.equal(inbox.messages[(0, a)], inbox.messages[(0, b)])


def test_alie_z_matches_baruch_et_al() -> None:
    # n = 50, f = 24 in the paper's notation gives s = 2 and z = Φ⁻¹(48/50) ≈ 1.75
    assert alie_z(50, 24) == pytest.approx(1.7507, abs=1e-3)
    assert alie_z(3, 1) == pytest.approx(0.4307, abs=1e-3)
