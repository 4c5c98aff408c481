"""X.509 certificates that bind a TLS connection to a roster identity (Ed25519).

**Why not an Ed25519 certificate in TLS directly.** gRPC's TLS (BoringSSL in grpcio 1.85) refuses
an Ed25519 certificate as the TLS key: BoringSSL leaves Ed25519 out of the signature algorithms it
offers by default and gRPC gives no way to add it, so a mutual TLS 1.3 handshake on loopback fails
with ``NO_COMMON_SIGNATURE_ALGORITHMS`` (checked on 127.0.0.1 before this module was written).
BoringSSL *does* verify Ed25519 signatures on certificates in a chain, so the Ed25519 key signs
certificates and an ECDSA P-256 key does the handshake:

- **identity certificate** (``d2ora keygen`` writes it beside the key, ``peer-3.key`` ->
  ``peer-3.crt``): self-signed by the peer's Ed25519 key, a CA limited to path length 0, common
  name ``d2ora ed25519:<base64>`` (the roster's string for the key), valid without end (RFC 5280
  §4.1.2.5's 9999-12-31, like the key itself). It holds nothing secret; the roster points at it.
- **link certificate**: made when a link starts, for a fresh ECDSA P-256 key that never touches the
  disk, named ``peer-<id>.d2ora`` and *issued by the identity certificate*, i.e. signed with the
  Ed25519 key. That signature is the binding of the TLS key to the roster identity, and it is the
  ordinary X.509 one, so BoringSSL checks it in the handshake (no extension of our own to parse)
  and :func:`issued_by` checks it again when a server maps a caller to its roster id.

The peer sends both certificates; the other side's trust store holds only roster identity
certificates, each checked here against the roster's public key, so a key not on the roster
cannot complete a handshake. All of it is the ``cryptography`` library's X.509 builder.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from d2ora.atomic import write_text
from d2ora.trust.identity import IdentityError, public_key_string

#: RFC 5280 §4.1.2.5: "no well-defined expiration date" -- an identity lasts as long as its key.
NO_EXPIRY = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
#: Certificates start a day in the past so a peer whose clock runs behind still accepts them.
CLOCK_SKEW = dt.timedelta(days=1)
#: A link certificate outlives any run (its key dies with the process anyway).
LINK_VALIDITY = dt.timedelta(days=365)
CERT_SUFFIX = ".crt"
_PEM = serialization.Encoding.PEM


class CertificateError(IdentityError):
    """A certificate file that cannot be used: unreadable, not ours, or not for the roster's key."""


def certificate_path(key_path: str | os.PathLike[str]) -> Path:
    """Where ``d2ora keygen`` puts a key's identity certificate: ``peer-3.key`` -> ``peer-3.crt``."""
    return Path(key_path).with_suffix(CERT_SUFFIX)


def tls_name(peer: int) -> str:
    """The DNS name in peer ``peer``'s link certificate; clients ask for it when they connect."""
    return f"peer-{peer}.d2ora"


def _public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------------------- identity certificate
def identity_certificate(key: Ed25519PrivateKey) -> x509.Certificate:
    """The self-signed identity certificate of ``key``: a CA that may only issue link certificates."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d2ora " + public_key_string(key))])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(NO_EXPIRY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)  # Ed25519 signs the message itself: no separate hash algorithm
    )


def write_identity_certificate(path: str | os.PathLike[str], key: Ed25519PrivateKey) -> x509.Certificate:
    """Write ``key``'s identity certificate as PEM, atomically (it is public: the umask's mode)."""
    certificate = identity_certificate(key)
    write_text(path, certificate.public_bytes(_PEM).decode("ascii"))
    return certificate


def load_identity_certificate(path: str | os.PathLike[str], expected: Ed25519PublicKey | None = None, where: str = "") -> x509.Certificate:
    """An identity certificate from a PEM file, checked: one certificate, an Ed25519 key, validly
    self-signed, a CA; and, when ``expected`` is given, for exactly that key. CertificateError otherwise."""
    path = Path(path)
    label = f"{where}: certificate {path}" if where else f"certificate {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{label}: cannot read it ({exc.strerror})") from None
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{label}: not a PEM certificate") from None
    if len(chain) != 1:
        raise CertificateError(f"{label}: holds {len(chain)} certificates, an identity certificate is one")
    certificate = chain[0]
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise CertificateError(f"{label}: its key is {type(key).__name__}, not Ed25519 (write it with d2ora keygen)")
    if not issued_by(certificate, certificate):
        raise CertificateError(f"{label}: its self-signature does not verify")
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertificateError(f"{label}: not an identity certificate (no CA basic constraint)")
    if expected is not None and _public_raw(key) != _public_raw(expected):
        raise CertificateError(
            f"{label}: is for {public_key_string(key)}, but the roster says {public_key_string(expected)}"
        )
    return certificate


def issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer`` signed ``certificate`` (issuer name and signature; cryptography's check)."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# -------------------------------------------------------------------------------- link certificate
@dataclass(frozen=True)
class LinkCredentials:
    """What one peer's link presents in every handshake: a fresh P-256 key and its certificate chain."""

    peer: int
    private_key_pem: bytes  # PKCS#8, unencrypted: it lives only in this process's memory
    chain_pem: bytes  # link certificate, then the identity certificate that issued it
    certificate: x509.Certificate


def link_credentials(peer: int, key: Ed25519PrivateKey, identity: x509.Certificate) -> LinkCredentials:
    """A new ECDSA P-256 TLS key and its certificate for peer ``peer``, issued by ``identity`` (signed with ``key``)."""
    if _public_raw(identity.public_key()) != _public_raw(key.public_key()):  # type: ignore[arg-type]
        raise CertificateError(f"the identity certificate is not for this key ({public_key_string(key)})")
    tls_key = ec.generate_private_key(ec.SECP256R1())
    name = tls_name(peer)
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(identity.subject)
        .public_key(tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + LINK_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )
    private_pem = tls_key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return LinkCredentials(peer, private_pem, certificate.public_bytes(_PEM) + identity.public_bytes(_PEM), certificate)
