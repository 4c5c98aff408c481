"""Topologies and mixing matrices: builders, errors, stochasticity, spectral gaps, consensus rate."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch

from d2ora import topology as topo
from d2ora.topology import MixingMatrixError, TopologyError


def degrees(graph: nx.Graph) -> list[int]:
    return [d for _, d in sorted(graph.degree)]


def independent_gap(w: np.ndarray) -> float:
    """1 − second-largest |eigenvalue|, with the general (non-symmetric) solver."""
    moduli = sorted(np.abs(np.linalg.eigvals(w)), reverse=True)
    return 1.0 - moduli[1]


def sample_graphs() -> list[nx.Graph]:
    return [
        topo.ring(7),
        topo.torus(12),
        topo.exponential(10),
        topo.star(5),
        topo.erdos_renyi(15, 0.3, seed=3),
        topo.complete(6),
    ]


# ---------------------------------------------------------------------------- builders


def test_ring_is_a_cycle():
    g = topo.ring(8)
    assert list(g.nodes) == list(range(8))
    assert g.number_of_edges() == 8
    assert degrees(g) == [2] * 8
    assert g.has_edge(7, 0)
    assert g.graph["topology"] == "ring"


def test_torus_shapes_and_degrees():
    g = topo.torus(9)
    assert (g.graph["rows"], g.graph["cols"]) == (3, 3)
    assert g.number_of_nodes() == 9 and g.number_of_edges() == 18
    assert degrees(g) == [4] * 9
    # Peer 0 = (row 0, col 0): right 1, left 2 (wrap), down 3, up 6 (wrap).
    assert set(g[0]) == {1, 2, 3, 6}
    assert (topo.torus(12).graph["rows"], topo.torus(12).graph["cols"]) == (3, 4)
    assert topo.torus(16).name == "torus(4x4)"
    assert topo.torus(36).name == "torus(6x6)"
    assert topo.torus(15, rows=5).name == "torus(5x3)"


@pytest.mark.parametrize("n", [7, 8, 10, 11])
def test_torus_rejects_counts_without_a_3x3_factorisation(n):
    with pytest.raises(TopologyError, match="rows x cols"):
        topo.torus(n)


def test_torus_rejects_bad_rows():
    with pytest.raises(TopologyError, match="rows=4"):
        topo.torus(15, rows=4)


def test_exponential_n8_by_hand():
    g = topo.exponential(8)
    # Offsets ±1, ±2, ±4 mod 8; +4 and −4 are the same peer, so 5 neighbours each.
    assert set(g[0]) == {1, 7, 2, 6, 4}
    assert set(g[3]) == {4, 2, 5, 1, 7}
    assert degrees(g) == [5] * 8
    assert g.number_of_edges() == 8 * 5 // 2


def test_exponential_small_and_odd():
    assert degrees(topo.exponential(2)) == [1, 1]
    # n = 6: offsets 1, 2, 4 (floor(log2 5) = 2); +4 ≡ −2 and −4 ≡ +2, so degree 4.
    assert set(topo.exponential(6)[0]) == {1, 5, 2, 4}
    # n = 9: offsets 1, 2, 4, 8 (floor(log2 8) = 3); +8 ≡ −1, so {±1, ±2, ±4}: degree 6.
    assert set(topo.exponential(9)[0]) == {1, 8, 2, 7, 4, 5}


def test_complete_and_star():
    g = topo.complete(5)
    assert g.number_of_edges() == 10 and degrees(g) == [4] * 5
    assert topo.complete(1).number_of_nodes() == 1
    s = topo.star(6)
    assert s.graph["server"] == 0
    assert s.number_of_edges() == 5
    assert degrees(s) == [5, 1, 1, 1, 1, 1]


def test_erdos_renyi_is_connected_seeded_and_reproducible():
    a = topo.erdos_renyi(20, 0.25, seed=7)
    b = topo.erdos_renyi(20, 0.25, seed=7)
    assert nx.is_connected(a)
    assert sorted(a.edges) == sorted(b.edges)
    assert a.graph["seed"] >= 7
    assert topo.erdos_renyi(6, 1.0).number_of_edges() == 15


def test_erdos_renyi_gives_up_naming_p():
    with pytest.raises(TopologyError, match=r"p=0\.01.*5 tries"):
        topo.erdos_renyi(20, 0.01, seed=0, max_tries=5)
    with pytest.raises(TopologyError, match="probability"):
        topo.erdos_renyi(5, 1.5)


# ---------------------------------------------------------------------------- build_topology


def test_build_topology_dispatch():
    assert topo.build_topology("ring", 5).name == "ring(5)"
    assert topo.build_topology("Erdos-Renyi", 10, p=0.5, seed=1).graph["topology"] == "erdos_renyi"
    assert set(topo.TOPOLOGY_NAMES) == {"ring", "torus", "exponential", "erdos_renyi", "complete", "star", "file"}


def test_build_topology_unknown_name_lists_valid_ones():
    with pytest.raises(TopologyError, match="unknown topology 'mesh'.*ring.*torus.*file"):
        topo.build_topology("mesh", 4)


@pytest.mark.parametrize(
    ("name", "n", "match"),
    [
        ("ring", 2, "at least 3 peers, got 2.*complete"),
        ("star", 1, "at least 2 peers"),
        ("complete", 0, "at least 1 peers"),
        ("exponential", 1, "at least 2 peers"),
        ("torus", 4, "at least 9 peers"),
        ("ring", 3.0, "must be an integer"),
    ],
)
def test_build_topology_peer_minimums(name, n, match):
    with pytest.raises(TopologyError, match=match):
        topo.build_topology(name, n)


def test_build_topology_parameters():
    with pytest.raises(TopologyError, match="needs parameter p"):
        topo.build_topology("erdos_renyi", 5)
    with pytest.raises(TopologyError, match=r"no parameter 'q'.*accepted: p, seed, max_tries"):
        topo.build_topology("erdos_renyi", 5, p=0.5, q=1)
    with pytest.raises(TopologyError, match="no parameter 'p'"):
        topo.build_topology("ring", 5, p=0.5)


# ---------------------------------------------------------------------------- edge-list files


def test_edge_list_file(tmp_path):
    path = tmp_path / "edges.txt"
    path.write_text("# a square with a diagonal\n0 1\n1 2  # trailing comment\n\n2 3\n3 0\n0 2\n2 0\n1 1\n")
    g = topo.build_topology("file", 4, path=path)
    assert g.number_of_edges() == 5  # duplicate "2 0" is the same link; self-loop "1 1" ignored
    assert nx.number_of_selfloops(g) == 0
    assert degrees(g) == [3, 2, 3, 2]
    assert topo.from_edge_list(path).number_of_nodes() == 4


def test_edge_list_two_components_is_rejected(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("0 1\n1 2\n3 4\n4 5\n")
    with pytest.raises(TopologyError, match=r"not connected: 2 components \(sizes 3, 3\).*peers 3, 4, 5"):
        topo.build_topology("file", 6, path=path)
    # A peer that appears in no edge is its own component.
    path.write_text("0 1\n1 2\n")
    with pytest.raises(TopologyError, match="2 components"):
        topo.from_edge_list(path, n=4)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0 1\n1 2 3\n", "line 2: expected two peer ids"),
        ("0 1\n\n# c\n1\n", "line 4: expected two peer ids"),
        ("0 1\n1 x\n", "line 2: peer id 'x' is not a non-negative integer"),
        ("0 -1\n", "line 1: peer id '-1'"),
        ("0 1.0\n", r"line 1: peer id '1\.0'"),
        ("0 1\n1 9\n", "line 2: peer id 9 is out of range for 3 peers"),
        ("# nothing\n\n", "has no edges"),
    ],
)
def test_edge_list_bad_lines(tmp_path, text, match):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(TopologyError, match=match):
        topo.from_edge_list(path, n=3)


def test_edge_list_missing_file(tmp_path):
    with pytest.raises(TopologyError, match="not found"):
        topo.build_topology("file", 3, path=tmp_path / "nope.txt")


# ---------------------------------------------------------------------------- mixing matrices


@pytest.mark.parametrize("graph", sample_graphs(), ids=lambda g: g.name)
def test_metropolis_hastings_is_symmetric_doubly_stochastic_on_the_graph(graph):
    w = topo.mixing_matrix(graph)
    n = graph.number_of_nodes()
    assert w.shape == (n, n) and w.dtype == np.float64
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(w, w.T)
    for i in range(n):
        for j in range(n):
            if i != j and not graph.has_edge(i, j):
                assert w[i, j] == 0.0
            elif i != j:
                deg = max(graph.degree[i], graph.degree[j])
                assert w[i, j] == pytest.approx(1.0 / (1 + deg))
    # Self-weight at least 1/(1 + deg): never an eigenvalue −1.
    assert all(w[i, i] >= 1.0 / (1 + graph.degree[i]) - 1e-12 for i in range(n))


@pytest.mark.parametrize("graph", [topo.ring(6), topo.torus(9), topo.exponential(8), topo.complete(4)], ids=str)
def test_uniform_equals_metropolis_hastings_on_regular_graphs(graph):
    w = topo.mixing_matrix(graph, "uniform")
    np.testing.assert_allclose(w, topo.metropolis_hastings(graph), atol=1e-15)


def test_uniform_on_irregular_graph_needs_permission():
    g = topo.star(5)
    with pytest.raises(MixingMatrixError, match=r"not doubly stochastic: column 0 sums to 2\.2.*allow_row_stochastic"):
        topo.mixing_matrix(g, "uniform")
    w = topo.mixing_matrix(g, "uniform", allow_row_stochastic=True)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert w[0, 0] == pytest.approx(1 / 5) and w[1, 1] == pytest.approx(1 / 2)
    with pytest.raises(MixingMatrixError, match="unknown mixing rule 'max'"):
        topo.mixing_matrix(g, "max")


def test_validate_mixing_matrix_names_the_problem():
    g = topo.ring(4)
    good = topo.metropolis_hastings(g)
    assert topo.validate_mixing_matrix(good, g) is not None
    with pytest.raises(MixingMatrixError, match="square"):
        topo.validate_mixing_matrix(np.ones((2, 3)) / 3)
    neg = good.copy()
    neg[0, 0], neg[0, 1] = -0.1, good[0, 1] + good[0, 0] + 0.1
    with pytest.raises(MixingMatrixError, match=r"entry \[0, 0\] is -0\.1"):
        topo.validate_mixing_matrix(neg)
    off = good.copy()
    off[0, 2], off[0, 0] = 0.1, good[0, 0] - 0.1
    with pytest.raises(MixingMatrixError, match=r"\[0, 2\].*share no edge"):
        topo.validate_mixing_matrix(off, g)
    rows = good.copy()
    rows[2, 2] += 0.05
    with pytest.raises(MixingMatrixError, match=r"row 2 sums to 1\.05"):
        topo.validate_mixing_matrix(rows)
    # Row-stochastic but not column-stochastic: one clear error naming the column.
    lazy = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    with pytest.raises(MixingMatrixError, match=r"not doubly stochastic: column 0 sums to 1\.5"):
        topo.validate_mixing_matrix(lazy)
    topo.validate_mixing_matrix(lazy, doubly_stochastic=False)
    with pytest.raises(MixingMatrixError, match="4x4 but topology 'ring\\(5\\)' has 5 peers"):
        topo.validate_mixing_matrix(good, topo.ring(5))


def test_validate_accepts_float32_torch_weights():
    w = torch.from_numpy(topo.metropolis_hastings(topo.exponential(10))).float()
    out = topo.validate_mixing_matrix(w, topo.exponential(10))
    assert out.dtype == np.float64


def test_star_server_weights_is_one_fedavg_round():
    w = topo.star_server_weights(5)
    np.testing.assert_allclose(w[:, 0], 0.0)
    np.testing.assert_allclose(w[:, 1:], 0.25)
    topo.validate_mixing_matrix(w, doubly_stochastic=False)
    with pytest.raises(MixingMatrixError, match="column 0 sums to 0"):
        topo.validate_mixing_matrix(w)
    assert topo.spectral_gap(w) == pytest.approx(1.0)
    weighted = topo.star_server_weights(3, client_weights=[1, 3])
    np.testing.assert_allclose(weighted[2], [0.0, 0.25, 0.75])
    # Restricted to the clients it is the complete graph's uniform matrix (what FedAvgMixer applies to P peers).
    np.testing.assert_allclose(w[1:, 1:], topo.mixing_matrix(topo.complete(4), "uniform"))
    with pytest.raises(MixingMatrixError, match="need 2 client weights"):
        topo.star_server_weights(3, client_weights=[1.0])


# ---------------------------------------------------------------------------- spectral gap


@pytest.mark.parametrize("graph", sample_graphs(), ids=lambda g: g.name)
def test_spectral_gap_matches_independent_eigvals(graph):
    w = topo.mixing_matrix(graph)
    assert topo.spectral_gap(w) == pytest.approx(independent_gap(w), abs=1e-10)


def test_spectral_gap_non_symmetric_path():
    w = topo.mixing_matrix(topo.star(6), "uniform", allow_row_stochastic=True)
    assert not np.allclose(w, w.T)
    assert topo.spectral_gap(w) == pytest.approx(independent_gap(w), abs=1e-10)


def test_spectral_gap_complete_uniform_is_one():
    w = topo.mixing_matrix(topo.complete(7), "uniform")
    np.testing.assert_allclose(w, np.full((7, 7), 1 / 7))
    assert topo.spectral_gap(w) == pytest.approx(1.0, abs=1e-12)
    assert topo.spectral_gap(np.ones((1, 1))) == 1.0


@pytest.mark.parametrize("n", [3, 4, 5, 8, 11])
def test_spectral_gap_ring_closed_form(n):
    w = topo.mixing_matrix(topo.ring(n))
    # Circulant with weights 1/3 on self and both neighbours: eigenvalues 1/3 + (2/3) cos(2πk/n).
    eig = np.array([1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n) for k in range(n)])
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(w)), np.sort(eig), atol=1e-12)
    expected = 1.0 - sorted(np.abs(eig), reverse=True)[1]
    assert topo.spectral_gap(w) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", [3, 5, 10])
def test_spectral_gap_star_metropolis_is_one_over_n(n):
    # W = I − L/n; the star Laplacian has eigenvalues 0, 1 (n − 2 times), n.
    assert topo.spectral_gap(topo.mixing_matrix(topo.star(n))) == pytest.approx(1.0 / n, abs=1e-12)


def test_spectral_gap_zero_when_disconnected():
    w = topo.metropolis_hastings(nx.disjoint_union(topo.ring(3), topo.ring(3)))
    assert topo.spectral_gap(w) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("graph", sample_graphs(), ids=lambda g: g.name)
def test_gossip_disagreement_shrinks_at_least_geometrically(graph):
    w = topo.mixing_matrix(graph)
    rate = 1.0 - topo.spectral_gap(w)
    x = np.random.default_rng(0).normal(size=(graph.number_of_nodes(), 3))
    mean = x.mean(axis=0)
    start = np.linalg.norm(x - mean)
    for t in range(1, 61):
        x = w @ x
        np.testing.assert_allclose(x.mean(axis=0), mean, atol=1e-12)  # doubly stochastic: average kept
        assert np.linalg.norm(x - mean) <= rate**t * start + 1e-12
    assert np.linalg.norm(x - mean) < 1e-2 * start


# ---------------------------------------------------------------------------- summary


def test_describe_one_line():
    g = topo.ring(8)
    line = topo.describe(g, topo.mixing_matrix(g))
    gap = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8))  # |λ₂| from the ring's closed form
    assert line == f"topology ring(8): 8 peers, 8 edges, degree 2, spectral gap {gap:.4g}"
    s = topo.summarize(topo.star(4))
    assert (s.peers, s.edges, s.min_degree, s.max_degree, s.server) == (4, 3, 1, 3, 0)
    assert "degree 1..3" in str(s) and "server peer 0" in str(s)
    assert "\n" not in topo.describe(topo.erdos_renyi(12, 0.4))
