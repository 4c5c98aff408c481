"""RFC 6962 Merkle tree hashes and inclusion proofs (Certificate Transparency, RFC 6962 §2.1).

A ledger's round block commits to the envelopes its peer accepted with one Merkle root, so a
single envelope can later be shown to be part of that round (an audit path of log2(n) hashes)
without handing over the others.

Definitions (RFC 6962 §2.1): ``MTH({}) = SHA-256()``, ``MTH({d0}) = SHA-256(0x00 || d0)`` and for
n > 1, with k the largest power of two smaller than n, ``MTH(D[n]) = SHA-256(0x01 || MTH(D[0:k]) ||
MTH(D[k:n]))``. The 0x00 / 0x01 prefixes keep a leaf from ever hashing like an inner node (the
second-preimage defence of the RFC).

Hand-written on purpose: no maintained PyPI package offers RFC 6962 audit paths without pulling in a
whole Certificate Transparency client, and the algorithm is a few dozen lines that the tests check
against the published Trillian / transparency-dev test vectors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_BYTES = 32


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _root_of_hashes(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    # Index ranges instead of slices: the leaf hashes are computed once and never copied.
    if hi - lo == 1:
        return hashes[lo]
    k = _split(hi - lo)
    return node_hash(_root_of_hashes(hashes, lo, lo + k), _root_of_hashes(hashes, lo + k, hi))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH of ``leaves`` (the leaf *data*, hashed here with :func:`leaf_hash`)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    hashes = [leaf_hash(d) for d in leaves]
    return _root_of_hashes(hashes, 0, len(hashes))


def _path(hashes: Sequence[bytes], index: int, lo: int, hi: int) -> list[bytes]:
    # RFC 6962 §2.1.1: PATH(m, D[n]) = PATH(m, D[0:k]) : MTH(D[k:n]) for m < k,
    # PATH(m - k, D[k:n]) : MTH(D[0:k]) otherwise; the empty list for a single leaf.
    if hi - lo == 1:
        return []
    k = _split(hi - lo)
    if index < lo + k:
        return _path(hashes, index, lo, lo + k) + [_root_of_hashes(hashes, lo + k, hi)]
    return _path(hashes, index, lo + k, hi) + [_root_of_hashes(hashes, lo, lo + k)]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``leaves`` (RFC 6962 §2.1.1), leaf side first."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} is outside a tree of {len(leaves)} leaves")
    hashes = [leaf_hash(d) for d in leaves]
    return _path(hashes, index, 0, len(hashes))


def verify_inclusion(leaf_data: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """True when ``proof`` shows ``leaf_data`` is leaf ``index`` of the tree of ``tree_size`` leaves
    whose root is ``root``; the algorithm of RFC 9162 §2.1.3.2, which also rejects a proof that is
    too long or too short for the tree's shape."""
    if not 0 <= index < tree_size or len(root) != HASH_BYTES:
        return False
    fn, sn = index, tree_size - 1
    r = leaf_hash(leaf_data)
    for p in proof:
        if sn == 0 or len(p) != HASH_BYTES:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # A right-edge node without a sibling at this level is promoted unchanged: skip the
            # levels until fn is a right child again (or the root is reached).
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root
