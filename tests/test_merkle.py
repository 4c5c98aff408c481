"""RFC 6962 Merkle trees against the published Trillian / transparency-dev vectors and a reference."""

from __future__ import annotations

import base64
import hashlib

import pytest

from d2ora.trust.merkle import (
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_inclusion,
)

# transparency-dev/merkle testonly/constants.go (LeafInputs, RootHashes): the Certificate
# Transparency reference vectors, the same in the CT C++ and Trillian test suites.
LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f",
)]
ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # the empty tree
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
# transparency-dev/merkle testonly/reference_test.go, TestRefInclusionProof: (index, size) -> path.
PATHS = {
    (0, 1): [],
    (0, 2): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"],
    (1, 2): ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"],
    (0, 8): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (5, 8): ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
}
# transparency-dev/merkle compact/range_test.go TestGetRootHashGolden (also Trillian's
# TestRootHashForVariousTreeSizes): leaf i is the two bytes i & 0xff, (i >> 8) & 0xff.
GOLDEN = {
    10: "VjWMPSYNtCuCNlF/RLnQy6HcwSk6CIipfxm+hettA+4=",
    15: "j4SulYmocFuxdeyp12xXCIgK6PekBcxzAIj4zbQzNEI=",
    16: "c+4Uc6BCMOZf/v3NZK1kqTUJe+bBoFtOhP+P3SayKRE=",
    100: "dUh9hYH88p0CMoHkdr1wC2szbhcLAXOejWpINIooKUY=",
    255: "SmdsuKUqiod3RX2jyF2M6JnbdE4QuTwwipfAowI4/i0=",
    256: "qFI0t/tZ1MdOYgyPpPzHFiZVw86koScXy9q3FU5casA=",
    1000: "RXrgb8xHd55Y48FbfotJwCbV82Kx22LZfEbmBGAvwlQ=",
}


def test_hashers_match_rfc6962_vectors() -> None:
    # transparency-dev/merkle rfc6962/rfc6962_test.go, TestRFC6962Hasher.
    assert leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert leaf_hash(b"L123456").hex() == "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    assert node_hash(b"N123", b"N456").hex() == "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"


@pytest.mark.parametrize("size", range(9))
def test_roots_match_the_ct_vectors(size: int) -> None:
    assert merkle_root(LEAVES[:size]) == ROOTS[size]


@pytest.mark.parametrize("size", sorted(GOLDEN))
def test_roots_of_larger_trees_match_golden_values(size: int) -> None:
    leaves = [bytes((i & 0xFF, (i >> 8) & 0xFF)) for i in range(size)]
    assert merkle_root(leaves) == base64.b64decode(GOLDEN[size])


@pytest.mark.parametrize(("index", "size"), sorted(PATHS))
def test_audit_paths_match_the_vectors(index: int, size: int) -> None:
    proof = inclusion_proof(LEAVES[:size], index)
    assert [p.hex() for p in proof] == PATHS[(index, size)]
    assert verify_inclusion(LEAVES[index], index, size, proof, ROOTS[size])


def _reference_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 §2.1 written out literally (slices, recursion), independent of the module's ranges."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _reference_root(leaves[:k]) + _reference_root(leaves[k:])).digest()


def _reference_path(leaves: list[bytes], m: int) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return _reference_path(leaves[:k], m) + [_reference_root(leaves[k:])]
    return _reference_path(leaves[k:], m - k) + [_reference_root(leaves[:k])]


def _tampered(proof: list[bytes], root: bytes) -> list[list[bytes]]:
    """Every way transparency-dev's corruptInclusionProof breaks a proof (extra, missing, flipped hashes)."""
    out = [proof + [b""], proof + [root], [b""] + proof, [root] + proof]
    for i in range(len(proof)):
        flipped = bytearray(proof[i])
        flipped[0] ^= 8
        out.append(proof[:i] + [bytes(flipped)] + proof[i + 1 :])
    if proof:
        out.append(proof[:-1])
    if len(proof) > 1:
        out.append([proof[0], hashlib.sha256(b"some hash").digest()] + proof[1:])
    return out


def test_every_proof_round_trips_and_every_tampered_one_fails() -> None:
    for size in range(1, 21):
        leaves = [hashlib.sha256(f"envelope {i}".encode()).digest() for i in range(size)]
        root = merkle_root(leaves)
        assert root == _reference_root(leaves)
        for index in range(size):
            proof = inclusion_proof(leaves, index)
            assert proof == _reference_path(leaves, index)
            assert verify_inclusion(leaves[index], index, size, proof, root)
            # wrong leaf, wrong position, wrong tree size, wrong root
            assert not verify_inclusion(leaves[index] + b"x", index, size, proof, root)
            for other in {index - 1, index + 1, index ^ 2} - {index}:
                assert not verify_inclusion(leaves[index], other, size, proof, root)
            # (size + 1 is not a tamper: a leaf of the left complete subtree has the same path there)
            for other_size in {size * 2, size // 2} - {size}:
                assert not verify_inclusion(leaves[index], index, other_size, proof, root)
            assert not verify_inclusion(leaves[index], index, size, proof, hashlib.sha256(b"").digest())
            for bad in _tampered(proof, root):
                assert not verify_inclusion(leaves[index], index, size, bad, root), (size, index, bad)


def test_out_of_range_inputs() -> None:
    with pytest.raises(IndexError, match="outside a tree of 3 leaves"):
        inclusion_proof(LEAVES[:3], 3)
    assert not verify_inclusion(b"", 0, 0, [], ROOTS[0])
    assert not verify_inclusion(b"", -1, 1, [], ROOTS[1])
    assert not verify_inclusion(b"", 0, 1, [], ROOTS[1][:31])
    assert verify_inclusion(b"", 0, 1, [], ROOTS[1])
