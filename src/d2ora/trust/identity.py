"""Peer identities: Ed25519 key files, public-key strings and the roster of who may take part.

Keys come from the ``cryptography`` library (Ed25519, RFC 8032); nothing here implements
cryptography by hand. A private key lives in a PEM file (PKCS#8, optionally encrypted with a
passphrase) that only its owner may read: a key file readable by group or others is refused,
as ssh does, because anyone who can read it can sign as that peer. Public keys travel as
``ed25519:<base64 of the 32 raw bytes>``.

A roster (YAML or JSON) maps peer ids to public keys and optional names::

    peers:
      0: {public_key: "ed25519:1xX...", name: "hospital-a"}
      1: "ed25519:Q2F..."
      2: {public_key: "ed25519:Zm9...", address: "b.example.org:7443", certificate: "certs/peer-2.crt"}

``address`` (``host:port``, where the peer's link listens) and ``certificate`` (its identity
certificate from ``d2ora keygen``, a path relative to the roster's folder) are optional and used
only by the network links (``d2ora.p2p``). They are not part of a peer's identity, so the digest
leaves them out and a roster keeps its digest when they are added.

Its digest is the SHA-256 of a canonical JSON form (sorted ids, keys as strings), so the same
roster hashes the same whether written as YAML or JSON; that digest goes into the ledger's genesis.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_PREFIX = "ed25519:"


class IdentityError(ValueError):
    """A key or roster file that cannot be used: wrong format, wrong passphrase, unsafe permissions."""


# ------------------------------------------------------------------------------------- public keys
def public_key_string(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``ed25519:<base64 of the raw 32-byte public key>``."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str, where: str = "public key") -> Ed25519PublicKey:
    """The key in an ``ed25519:<base64>`` string; IdentityError naming ``where`` otherwise."""
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise IdentityError(f"{where}: expected 'ed25519:<base64>', got {text!r}")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(f"{where}: not valid base64") from None
    if len(raw) != 32:
        raise IdentityError(f"{where}: an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s signature of ``message`` (RFC 8032)."""
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


# ------------------------------------------------------------------------------------ private keys
def write_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Generate an Ed25519 key and write it as PEM, mode 0600 from the first byte (never readable
    by others, not even briefly); refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    if path.exists() and not overwrite:
        raise IdentityError(f"{path} already exists; a key is an identity, so it is never replaced silently (use --force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by the umask; the key must be 0600 regardless
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def check_private_permissions(path: Path) -> None:
    """Refuse a key file that group or others may read or write."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"private key {path} is accessible by others (mode {mode:04o}); anyone who can read it can sign "
            f"as this peer: run chmod 600 {path}"
        )


def load_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file that only its owner can access."""
    path = Path(path)
    if not path.is_file():
        raise IdentityError(f"private key {path} does not exist")
    check_private_permissions(path)
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:  # encrypted without a passphrase, or a passphrase for an unencrypted key
        needs = b"ENCRYPTED" in data
        raise IdentityError(f"private key {path} {'needs a passphrase' if needs else 'is not encrypted: give no passphrase'}") from None
    except ValueError:
        raise IdentityError(f"private key {path}: not a PEM private key, or the passphrase is wrong") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"private key {path} is a {type(key).__name__}, not an Ed25519 key")
    return key


# ----------------------------------------------------------------------------------------- roster
@dataclass(frozen=True)
class Member:
    peer: int
    public_key: Ed25519PublicKey
    name: str | None = None
    address: str | None = None  # "host:port" of the peer's link (d2ora.p2p); not identity, not in the digest
    certificate: Path | None = None  # its identity certificate file, resolved against the roster's folder

    @property
    def key_string(self) -> str:
        return public_key_string(self.public_key)


@dataclass(frozen=True)
class Roster:
    """Who may take part: peer id -> public key (and name)."""

    members: dict[int, Member]

    def canonical(self) -> dict:
        return {str(p): {"public_key": m.key_string, "name": m.name} for p, m in sorted(self.members.items())}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def key_of(self, peer: int) -> Ed25519PublicKey:
        if peer not in self.members:
            raise IdentityError(f"peer {peer} is not on the roster")
        return self.members[peer].public_key

    def check_covers(self, peers: int) -> None:
        """Every peer 0..peers-1 must be on the roster (a run cannot include an unknown peer)."""
        missing = [p for p in range(peers) if p not in self.members]
        if missing:
            raise IdentityError(f"the roster has no key for peer(s) {missing}")


def parse_address(text: object, where: str = "address") -> str:
    """A ``host:port`` string (``[v6]:port`` for IPv6) with a port in 1..65535; IdentityError otherwise."""
    host, _, port = text.rpartition(":") if isinstance(text, str) else ("", "", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise IdentityError(f"{where}: expected 'host:port' with a port in 1..65535, got {text!r}")
    return text


_MEMBER_KEYS = ("public_key", "name", "address", "certificate")


def _member(peer_text: object, entry: object, source: Path) -> Member:
    try:
        peer = int(str(peer_text))
    except ValueError:
        raise IdentityError(f"{source}: peer id {peer_text!r} is not an integer") from None
    if peer < 0:
        raise IdentityError(f"{source}: peer id {peer} is negative")
    address = certificate = None
    if isinstance(entry, str):
        key_text, name = entry, None
    elif isinstance(entry, dict):
        unknown = set(entry) - set(_MEMBER_KEYS)
        if unknown or "public_key" not in entry:
            raise IdentityError(
                f"{source}: peer {peer} needs 'public_key' (and optionally 'name', 'address', 'certificate'), got keys {sorted(entry)}"
            )
        key_text, name = entry["public_key"], entry.get("name")
        if entry.get("address") is not None:
            address = parse_address(entry["address"], f"{source}: peer {peer} address")
        if entry.get("certificate") is not None:
            certificate = source.parent / str(entry["certificate"])
    else:
        raise IdentityError(f"{source}: peer {peer} must map to a public key string or {{public_key, name}}")
    key = parse_public_key(key_text, f"{source}: peer {peer}")
    return Member(peer, key, None if name is None else str(name), address, certificate)


def load_roster(path: str | os.PathLike[str]) -> Roster:
    """A roster from YAML or JSON (JSON is YAML); IdentityError naming the problem."""
    source = Path(path)
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise IdentityError(f"cannot read roster {source}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise IdentityError(f"roster {source} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("peers"), dict) or not data["peers"]:
        raise IdentityError(f"roster {source} needs a non-empty 'peers' mapping of peer id -> public key")
    members: dict[int, Member] = {}
    for peer_text, entry in data["peers"].items():
        member = _member(peer_text, entry, source)
        if member.peer in members:
            raise IdentityError(f"{source}: peer {member.peer} is listed twice")
        members[member.peer] = member
    keys = [m.key_string for m in members.values()]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise IdentityError(f"{source}: one public key is given to several peers ({duplicated[0]})")
    return Roster(members)
