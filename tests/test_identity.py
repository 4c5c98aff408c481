"""Peer identities: key files, public-key strings, rosters, signatures (RFC 8032 as the reference)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from d2ora.cli import app
from d2ora.trust.identity import (
    IdentityError,
    load_private_key,
    load_roster,
    parse_public_key,
    public_key_string,
    verify,
)

# RFC 8032, section 7.1, TEST 2 (one-byte message 0x72).
RFC_SECRET = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
RFC_PUBLIC = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
RFC_SIGNATURE = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)


def test_rfc8032_vector_through_our_helpers() -> None:
    key = Ed25519PrivateKey.from_private_bytes(RFC_SECRET)
    text = public_key_string(key)
    assert text == "ed25519:" + __import__("base64").b64encode(RFC_PUBLIC).decode()
    public = parse_public_key(text)
    assert key.sign(b"\x72") == RFC_SIGNATURE
    assert verify(public, RFC_SIGNATURE, b"\x72")
    forged = bytearray(RFC_SIGNATURE)
    forged[0] ^= 1
    assert not verify(public, bytes(forged), b"\x72")
    assert not verify(public, RFC_SIGNATURE, b"\x73")


def test_keygen_writes_a_private_0600_key_and_prints_its_public_key(tmp_path: Path) -> None:
    out = tmp_path / "keys" / "peer-3.key"
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(app, ["keygen", "--out", str(out)])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    key = load_private_key(out)
    assert result.output.strip() == public_key_string(key)
    again = CliRunner().invoke(app, ["keygen", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output  # an identity is never replaced silently
    assert load_private_key(out).private_bytes_raw() == key.private_bytes_raw()


def test_passphrase_protected_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "peer.key"
    monkeypatch.setenv("PEER_PASS", "correct horse")
    result = CliRunner().invoke(app, ["keygen", "--out", str(out), "--passphrase-env", "PEER_PASS"])
    assert result.exit_code == 0, result.output
    assert b"ENCRYPTED" in out.read_bytes()
    key = load_private_key(out, b"correct horse")
    assert result.output.strip() == public_key_string(key)
    with pytest.raises(IdentityError, match="needs a passphrase"):
        load_private_key(out)
    with pytest.raises(IdentityError, match="passphrase is wrong"):
        load_private_key(out, b"wrong")
    missing = CliRunner().invoke(app, ["keygen", "--out", str(tmp_path / "x.key"), "--passphrase-env", "NOPE_UNSET"])
    assert missing.exit_code == 2 and "NOPE_UNSET" in missing.output


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "peer.key"
    CliRunner().invoke(app, ["keygen", "--out", str(out)])
    out.chmod(0o644)
    with pytest.raises(IdentityError, match=r"accessible by others \(mode 0644\).*chmod 600"):
        load_private_key(out)
    (tmp_path / "not.key").write_text("hello")
    (tmp_path / "not.key").chmod(0o600)
    with pytest.raises(IdentityError, match="not a PEM private key"):
        load_private_key(tmp_path / "not.key")


def _keys(n: int) -> list[str]:
    return [public_key_string(Ed25519PrivateKey.generate()) for _ in range(n)]


def test_roster_from_yaml_and_json_hash_the_same(tmp_path: Path) -> None:
    keys = _keys(3)
    (tmp_path / "r.yaml").write_text(
        f"peers:\n  0: {{public_key: '{keys[0]}', name: hospital-a}}\n  1: '{keys[1]}'\n  2: '{keys[2]}'\n"
    )
    (tmp_path / "r.json").write_text(json.dumps({"peers": {"2": keys[2], "0": {"public_key": keys[0], "name": "hospital-a"},
                                                           "1": {"public_key": keys[1]}}}))
    a, b = load_roster(tmp_path / "r.yaml"), load_roster(tmp_path / "r.json")
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    assert a.members[0].name == "hospital-a" and public_key_string(a.key_of(1)) == keys[1]
    a.check_covers(3)
    with pytest.raises(IdentityError, match=r"peer\(s\) \[3\]"):
        a.check_covers(4)
    (tmp_path / "r2.yaml").write_text(f"peers:\n  0: '{keys[0]}'\n  1: '{keys[2]}'\n  2: '{keys[1]}'\n")
    assert load_roster(tmp_path / "r2.yaml").sha256 != a.sha256  # swapped keys: another roster


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("peers: {}", "non-empty 'peers'"),
        ("peers: {0: 'rsa:abc'}", "expected 'ed25519:<base64>'"),
        ("peers: {0: 'ed25519:!!!'}", "not valid base64"),
        ("peers: {0: 'ed25519:AAAA'}", "32 bytes"),
        ("peers: {x: 'ed25519:AAAA'}", "not an integer"),
        ("peers: {0: {key: 1}}", "needs 'public_key'"),
        ("peers: [", "not valid YAML"),
    ],
)
def test_bad_rosters_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(IdentityError, match=message):
        load_roster(tmp_path / "r.yaml")


def test_one_key_for_two_peers_is_refused(tmp_path: Path) -> None:
    key = _keys(1)[0]
    (tmp_path / "r.yaml").write_text(f"peers:\n  0: '{key}'\n  1: '{key}'\n")
    with pytest.raises(IdentityError, match="several peers"):
        load_roster(tmp_path / "r.yaml")
