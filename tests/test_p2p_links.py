"""Peer-to-peer links (d2ora.p2p): gRPC over mutual TLS 1.3 pinned to the roster, on 127.0.0.1 only.

The references are independent of the code under test: what each peer sent (kept in the test),
the roster that keygen's printed public keys went into, gRPC's own status codes, and the
``cryptography`` library's reading of the certificate files. Every wait has a deadline, and every
link is closed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding
from typer.testing import CliRunner

from d2ora.cli import app
from d2ora.p2p.certs import (
    CertificateError,
    certificate_path,
    identity_certificate,
    issued_by,
    link_credentials,
    write_identity_certificate,
)
from d2ora.p2p.channels import NeighbourChannel
from d2ora.p2p.frame import HEADER, MAGIC, VERSION, Frame, encode
from d2ora.p2p.inbox import LinkError, require_all
from d2ora.p2p.link import PeerLink
from d2ora.p2p.tls import TrustStore, Unauthenticated, authenticated_peer
from d2ora.trust.identity import IdentityError, Roster, load_private_key, load_roster, public_key_string

PEERS = 4
WAIT_S = 20.0  # an upper bound on any wait in these tests; nothing should come near it
MAX_PAYLOAD = 1 << 20


def ring(peer: int, n: int = PEERS) -> list[int]:
    return sorted({(peer - 1) % n, (peer + 1) % n})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Roster, dict[int, Ed25519PrivateKey], Path]:
    """Keys and certificates made by `d2ora keygen`, and a roster written from its printed lines."""
    folder = tmp_path_factory.mktemp("p2p")
    printed = {}
    for peer in range(PEERS):
        result = CliRunner().invoke(app, ["keygen", "--out", str(folder / "keys" / f"peer-{peer}.key")])
        assert result.exit_code == 0, result.output
        printed[peer] = result.output.strip()
    roster_file = folder / "roster.yaml"
    peers = {p: {"public_key": printed[p], "certificate": f"keys/peer-{p}.crt"} for p in range(PEERS)}
    roster_file.write_text(yaml.safe_dump({"peers": peers}))
    keys = {p: load_private_key(folder / "keys" / f"peer-{p}.key") for p in range(PEERS)}
    return load_roster(roster_file), keys, folder


@contextlib.contextmanager
def started(world, peers, neighbours=ring, connect: bool = True, **options) -> Iterator[dict[int, PeerLink]]:
    roster, keys, _ = world
    store = TrustStore.from_roster(roster)
    links: dict[int, PeerLink] = {}
    try:
        for peer in peers:
            links[peer] = PeerLink(peer, keys[peer], roster, neighbours(peer), store=store, max_payload=MAX_PAYLOAD, **options)
            links[peer].start()
        if connect:
            addresses = {p: f"127.0.0.1:{link.port}" for p, link in links.items()}
            for link in links.values():
                reachable = {n: a for n, a in addresses.items() if n in link.neighbours}
                assert link.connect(WAIT_S, reachable) == []
        yield links
    finally:
        for link in links.values():
            link.close(grace_s=0)


def pair(peer: int) -> list[int]:
    return [1 - peer]


def dead_address(world, peer: int) -> str:
    """An address where nobody listens: peer ``peer`` bound a free port there and stopped."""
    with started(world, [peer], connect=False) as links:
        port = links[peer].port
    return f"127.0.0.1:{port}"


def raw_channel(link: PeerLink, to: PeerLink) -> NeighbourChannel:
    """A channel with ``link``'s own certificate, for sending bodies the link itself would never build."""
    return NeighbourChannel(link.credentials, link.store, to.peer, f"127.0.0.1:{to.port}", 2 * MAX_PAYLOAD)


def eventually(condition, within_s: float = WAIT_S) -> bool:
    """Whether ``condition()`` holds within ``within_s`` seconds (for effects of background threads)."""
    give_up = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def rpc_code(call: grpc.Future) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call.result(timeout=WAIT_S)
    return caught.value.code()


# ------------------------------------------------------------------------------------- exchange
def test_peers_on_a_ring_receive_exactly_what_was_sent(world) -> None:
    rng = random.Random(0)
    sizes = [0, 1, 37, 200_000, MAX_PAYLOAD]  # empty, tiny, odd, large, exactly the limit
    sent: dict[tuple[int, int, int, int], bytes] = {}  # (sender, receiver, round, slot) -> payload
    with started(world, range(PEERS)) as links:
        for round_ in (0, 1):
            calls = []
            for peer, link in links.items():
                for slot in (0, 1):
                    for to in link.neighbours:
                        payload = rng.randbytes(rng.choice(sizes))
                        sent[(peer, to, round_, slot)] = payload
                        calls.append(link.send(to, round_, slot, payload))
            assert all(call.result(timeout=WAIT_S) == b"" for call in calls)
            for peer, link in links.items():
                for slot in (1, 0):  # order of reading does not matter
                    got = link.receive(link.neighbours, round_, slot, WAIT_S)
                    assert got.missing == ()
                    assert dict(got) == {s: sent[(s, peer, round_, slot)] for s in ring(peer)}
        assert all(not link.rejected and not link.send_failures for link in links.values())
        assert {p: dict(link.service.delivered) for p, link in links.items()} == {p: {s: 4 for s in ring(p)} for p in links}


# ----------------------------------------------------------------------------------- identities
def test_a_key_not_on_the_roster_fails_the_handshake(world, tmp_path) -> None:
    outsider = Ed25519PrivateKey.generate()
    identity = write_identity_certificate(tmp_path / "outsider.crt", outsider)
    with started(world, [0, 1], neighbours=pair) as links:
        server = links[0]
        # The outsider trusts peer 0's real certificate and presents a well-formed chain of its own,
        # under peer 1's name: everything right except that its key is not on the roster.
        store = TrustStore({**server.store.certificates, 1: identity})
        channel = NeighbourChannel(link_credentials(1, outsider, identity), store, 0, f"127.0.0.1:{server.port}", MAX_PAYLOAD)
        try:
            assert not channel.ready(1.0)  # every handshake attempt is refused, so it never connects
            # The call waits for a connection (wait_for_ready) that never comes, until its deadline.
            assert rpc_code(channel.deliver(encode(Frame(1, 0, 0, b"hello")), timeout_s=1.0)) == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            channel.close()
        assert not server.service.delivered and not server.rejected  # never reached the service
        assert server.receive([1], 0, 0, 0).missing == (1,)


class FakeContext:
    """Just the auth context of a call, as gRPC fills it in after a handshake."""

    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def test_a_call_maps_to_its_issuer_and_only_over_tls_1_3(world) -> None:
    roster, keys, _ = world
    store = TrustStore.from_roster(roster)
    leaf = link_credentials(3, keys[3], store.certificates[3]).certificate.public_bytes(Encoding.PEM)
    assert authenticated_peer(FakeContext({"ssl_tls_version": [b"TLSv1.3"], "x509_pem_cert": [leaf]}), store) == 3
    with pytest.raises(Unauthenticated, match=r"TLS version TLSv1\.2, only TLS 1\.3 is accepted"):
        authenticated_peer(FakeContext({"ssl_tls_version": [b"TLSv1.2"], "x509_pem_cert": [leaf]}), store)
    with pytest.raises(Unauthenticated, match="no client certificate"):
        authenticated_peer(FakeContext({"ssl_tls_version": [b"TLSv1.3"]}), store)
    outsider = Ed25519PrivateKey.generate()
    foreign = link_credentials(3, outsider, identity_certificate(outsider)).certificate.public_bytes(Encoding.PEM)
    with pytest.raises(Unauthenticated, match="was not issued by a roster identity"):
        authenticated_peer(FakeContext({"ssl_tls_version": [b"TLSv1.3"], "x509_pem_cert": [foreign]}), store)


def test_a_roster_peer_cannot_pose_as_another(world) -> None:
    """Peer 2 is on the roster and issues itself a link certificate named ``peer-1.d2ora``.
    As a server at the address peer 0 dials for peer 1, it fails the handshake: peer 0 trusts only
    peer 1's identity certificate on that channel. As a client, peer 0 files its message under the
    certificate's issuer (peer 2), not its name, and refuses the claim to be peer 1."""
    roster, keys, _ = world
    with started(world, [0], neighbours=lambda p: [1], in_neighbours=[1, 2], connect=False) as links:
        store = links[0].store
        impostor = PeerLink(2, keys[2], roster, [0], store=store)
        impostor.credentials = link_credentials(1, keys[2], store.certificates[2])  # the name is peer 1's
        impostor.service.accept_from = frozenset({0, 1})
        try:
            impostor.start()
            assert links[0].connect(1.0, {1: f"127.0.0.1:{impostor.port}"}) == [1]
            assert rpc_code(links[0].send(1, 0, 0, b"for peer 1 only", timeout_s=1.0)) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert not impostor.service.delivered and not impostor.rejected  # nothing reached it
            assert eventually(lambda: links[0].send_failures[1] == 1)  # gRPC runs done-callbacks after waking result()
            channel = NeighbourChannel(impostor.credentials, store, 0, f"127.0.0.1:{links[0].port}", MAX_PAYLOAD)
            try:
                call = channel.deliver(encode(Frame(1, 0, 0, b"from peer 1, honestly")), timeout_s=WAIT_S)
                assert rpc_code(call) == grpc.StatusCode.PERMISSION_DENIED
                assert "the frame says sender 1, the certificate is peer 2's" in call.details()
            finally:
                channel.close()
        finally:
            impostor.close(grace_s=0)
        assert links[0].rejected == {(2, "wrong_sender"): 1}


def test_a_peer_claiming_another_id_is_refused_and_named(world, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="d2ora.p2p")
    with started(world, range(PEERS)) as links:
        channel = raw_channel(links[1], links[0])
        try:
            call = channel.deliver(encode(Frame(3, 0, 0, b"i am peer 3")), timeout_s=WAIT_S)
            assert rpc_code(call) == grpc.StatusCode.PERMISSION_DENIED
            assert "the frame says sender 3, the certificate is peer 1's" in call.details()
        finally:
            channel.close()
        # Peer 2 is on the roster but not peer 0's neighbour on the ring.
        stranger = raw_channel(links[2], links[0])
        try:
            assert rpc_code(stranger.deliver(encode(Frame(2, 0, 0, b"x")), timeout_s=WAIT_S)) == grpc.StatusCode.PERMISSION_DENIED
        finally:
            stranger.close()
        assert links[0].rejected == {(1, "wrong_sender"): 1, (2, "not_a_neighbour"): 1}
        assert any("refused a message from peer 1" in r.getMessage() for r in caplog.records)
        assert links[0].receive([3], 0, 0, 0).missing == (3,)  # the forged message was not filed as peer 3's
        links[3].send(0, 0, 0, b"the real peer 3").result(timeout=WAIT_S)
        assert dict(links[0].receive([3], 0, 0, WAIT_S)) == {3: b"the real peer 3"}


def test_garbage_frames_are_refused_while_the_link_serves_others(world, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="d2ora.p2p")
    good = encode(Frame(1, 5, 0, b"payload"))
    garbage = {
        "too short": b"D2",
        "bad magic": b"XXXX" + good[4:],
        "bad version": HEADER.pack(MAGIC, VERSION + 1, 1, 5, 0, 7) + b"payload",
        "length says more": HEADER.pack(MAGIC, VERSION, 1, 5, 0, 8) + b"payload",
        "length says less": HEADER.pack(MAGIC, VERSION, 1, 5, 0, 6) + b"payload",
        "negative round": HEADER.pack(MAGIC, VERSION, 1, -5, 0, 7) + b"payload",
    }
    with started(world, range(PEERS)) as links:
        channel = raw_channel(links[1], links[0])
        try:
            codes = {what: rpc_code(channel.deliver(body, timeout_s=WAIT_S)) for what, body in garbage.items()}
            # Past the receive limit (header + max payload) gRPC itself refuses it, before the service reads it.
            huge = HEADER.pack(MAGIC, VERSION, 1, 5, 0, MAX_PAYLOAD + 1) + bytes(MAX_PAYLOAD + 1)
            assert rpc_code(channel.deliver(huge, timeout_s=WAIT_S)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            links[3].send(0, 5, 0, b"from peer 3").result(timeout=WAIT_S)  # the others are served meanwhile
            assert channel.deliver(good, timeout_s=WAIT_S).result(timeout=WAIT_S) == b""
            assert rpc_code(channel.deliver(good, timeout_s=WAIT_S)) == grpc.StatusCode.RESOURCE_EXHAUSTED  # a duplicate
        finally:
            channel.close()
        assert codes == {what: grpc.StatusCode.INVALID_ARGUMENT for what in garbage}
        assert links[0].rejected == {(1, "bad_frame"): len(garbage), (1, "inbox_refused"): 1}
        named = [r.getMessage() for r in caplog.records if "refused a message from peer 1" in r.getMessage()]
        assert len(named) == len(garbage) + 1
        assert dict(links[0].receive([1, 3], 5, 0, WAIT_S)) == {1: b"payload", 3: b"from peer 3"}
        with pytest.raises(LinkError, match=f"exceeds the link's limit of {MAX_PAYLOAD}"):
            links[1].send(0, 6, 0, bytes(MAX_PAYLOAD + 1))


def test_finished_rounds_are_dropped_and_refused(world) -> None:
    with started(world, [0, 1], neighbours=pair) as links:
        links[1].send(0, 0, 0, b"old").result(timeout=WAIT_S)
        assert links[0].drop_before(1) == 1
        assert rpc_code(links[1].send(0, 0, 1, b"late")) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert links[0].receive([1], 0, 0, 0).missing == (1,)


# ------------------------------------------------------------------------------------ deadlines
def test_a_missing_neighbour_is_named_after_the_deadline(world) -> None:
    deadline = 0.5
    nobody = dead_address(world, 2)
    with started(world, [0, 1, 3], connect=False) as links:  # peer 2 never starts
        addresses = {p: f"127.0.0.1:{link.port}" for p, link in links.items()} | {2: nobody}
        assert links[1].connect(deadline, addresses) == [2]
        assert links[0].connect(WAIT_S, addresses) == []
        links[0].send(1, 0, 0, b"from 0").result(timeout=WAIT_S)
        begun = time.monotonic()
        got = links[1].receive([0, 2], 0, 0, deadline)
        waited = time.monotonic() - begun
        assert dict(got) == {0: b"from 0"} and got.missing == (2,)
        assert deadline <= waited < deadline + WAIT_S  # it waited out the deadline, and returned
        with pytest.raises(LinkError, match=r"round 0 slot 0: no message from peer\(s\) \[2\] within 0.5 s"):
            require_all(got)
        with pytest.raises(LinkError, match=r"could not reach neighbour\(s\) \[2\]"):
            links[3].connect(0.2, addresses, strict=True)


def test_peers_start_in_any_order(world) -> None:
    roster, keys, _ = world
    address = dead_address(world, 1)  # peer 0 sends there before peer 1 has started
    with started(world, [0], neighbours=lambda p: [1], connect=False) as links:
        assert links[0].connect(0.2, {1: address}) == [1]
        call = links[0].send(1, 0, 0, b"sent before peer 1 was up", timeout_s=WAIT_S)
        late = PeerLink(1, keys[1], roster, ring(1), store=links[0].store, listen=address)
        try:
            late.start()
            assert call.result(timeout=WAIT_S) == b""
            assert dict(late.receive([0], 0, 0, WAIT_S)) == {0: b"sent before peer 1 was up"}
        finally:
            late.close(grace_s=0)


def test_a_busy_port_is_an_error(world) -> None:
    roster, keys, _ = world
    with started(world, [0], connect=False) as links:
        second = PeerLink(1, keys[1], roster, ring(1), store=links[0].store, listen=f"127.0.0.1:{links[0].port}")
        with pytest.raises(LinkError, match=f"peer 1 cannot listen on 127.0.0.1:{links[0].port}"):
            second.start()
        second.close()


# ------------------------------------------------------------------------- keygen's certificates
def test_keygen_writes_a_certificate_for_the_printed_key(world) -> None:
    roster, keys, folder = world
    for peer in range(PEERS):
        certificate = x509.load_pem_x509_certificate((folder / "keys" / f"peer-{peer}.crt").read_bytes())
        key = certificate.public_key()
        assert isinstance(key, Ed25519PublicKey) and public_key_string(key) == roster.members[peer].key_string
        certificate.verify_directly_issued_by(certificate)  # self-signed with that key (cryptography's check)
        assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The link certificate a peer presents is issued by its identity certificate, for a P-256 key.
    credentials = link_credentials(2, keys[2], TrustStore.from_roster(roster).certificates[2])
    assert credentials.certificate.public_key().curve.name == "secp256r1"
    assert issued_by(credentials.certificate, TrustStore.from_roster(roster).certificates[2])
    assert not issued_by(credentials.certificate, TrustStore.from_roster(roster).certificates[1])


def test_keygen_cert_only_and_refusals(tmp_path: Path) -> None:
    out = tmp_path / "peer-7.key"
    assert CliRunner().invoke(app, ["keygen", "--out", str(out)]).exit_code == 0
    key = load_private_key(out)
    cert = certificate_path(out)
    cert.unlink()
    again = CliRunner().invoke(app, ["keygen", "--out", str(out), "--cert-only"])
    assert again.exit_code == 0 and again.output.strip() == public_key_string(key)
    assert public_key_string(x509.load_pem_x509_certificate(cert.read_bytes()).public_key()) == public_key_string(key)
    stray = tmp_path / "peer-8.crt"
    stray.write_text("someone else's certificate")
    refused = CliRunner().invoke(app, ["keygen", "--out", str(tmp_path / "peer-8.key")])
    assert refused.exit_code == 2 and "peer-8.crt already exists" in refused.output
    assert not (tmp_path / "peer-8.key").exists()


def test_roster_certificates_must_match_the_roster_keys(world, tmp_path: Path) -> None:
    roster, keys, folder = world
    entries = {p: {"public_key": roster.members[p].key_string, "certificate": str(folder / "keys" / f"peer-{p}.crt")} for p in range(PEERS)}
    entries[1]["certificate"], entries[2]["certificate"] = entries[2]["certificate"], entries[1]["certificate"]
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(yaml.safe_dump({"peers": entries}))
    with pytest.raises(CertificateError, match=r"roster peer 1: certificate .*peer-2.crt: is for ed25519:.*, but the roster says"):
        TrustStore.from_roster(load_roster(swapped))
    del entries[1]["certificate"]
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"peers": entries}))
    with pytest.raises(CertificateError, match="roster peer 1 has no certificate"):
        TrustStore.from_roster(load_roster(missing))
    with pytest.raises(CertificateError, match="not for this key"):  # a key that is not peer 0's
        PeerLink(0, keys[1], roster, [1])


def test_roster_addresses_are_optional_and_outside_the_digest(world, tmp_path: Path) -> None:
    roster, _, _ = world
    plain = {p: roster.members[p].key_string for p in range(PEERS)}
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(yaml.safe_dump({"peers": plain}))
    new.write_text(yaml.safe_dump({"peers": {p: {"public_key": k, "address": f"site-{p}.example:7443"} for p, k in plain.items()}}))
    loaded_old, loaded_new = load_roster(old), load_roster(new)
    assert loaded_old.sha256 == loaded_new.sha256 == roster.sha256
    assert loaded_old.members[2].address is None and loaded_new.members[2].address == "site-2.example:7443"
    for bad in ("site-2.example", "host:0", "host:99999", ":7443"):
        new.write_text(yaml.safe_dump({"peers": {0: {"public_key": plain[0], "address": bad}}}))
        with pytest.raises(IdentityError, match=r"peer 0 address: expected 'host:port' with a port in 1..65535"):
            load_roster(new)
