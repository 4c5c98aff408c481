"""Communication graphs between peers, and the mixing matrices that gossip over them.

Each round every peer i replaces its adapter by ``Σ_j W[i, j] · x_j``, where ``W[i, j] != 0`` only
on i's closed neighbourhood (itself and the peers it has an edge to). This module builds the graph
(networkx, nodes ``0..n-1`` = peer ids), turns it into ``W`` (a float64 numpy array; the engine
hands the mixers ``torch.from_numpy(W)``), checks ``W``, and measures how fast it mixes.

- Builders (:func:`ring`, :func:`torus`, :func:`exponential`, :func:`erdos_renyi`,
  :func:`complete`, :func:`star`, :func:`from_edge_list`) are pure functions of their arguments.
  Each returns an undirected ``nx.Graph`` on nodes ``0..n-1`` with no self-loops that is
  connected, or raises :class:`TopologyError`. ``graph.name`` says what it is (``"torus(3x4)"``);
  ``graph.graph["topology"]`` is the registry name; the star also sets ``graph.graph["server"]``.
- :func:`build_topology` dispatches by name, for configs.
- :func:`mixing_matrix` gives a *doubly stochastic* ``W`` by default: then plain gossip keeps the
  average of all peers' adapters fixed and every peer converges to it (the decentralized-SGD
  analyses assume this). A rule that yields only a row-stochastic ``W`` is an error unless asked for.
- :func:`spectral_gap` is ``1 − |λ₂(W)|``: the disagreement between peers shrinks at least by
  ``1 − gap`` per round of pure mixing (for symmetric ``W``), so ``≈ 1/gap`` rounds per e-fold.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "MIN_PEERS",
    "MIXING_RULES",
    "TOPOLOGY_NAMES",
    "MixingMatrixError",
    "TopologyError",
    "TopologySummary",
    "build_topology",
    "check_connected",
    "complete",
    "describe",
    "erdos_renyi",
    "exponential",
    "from_edge_list",
    "metropolis_hastings",
    "mixing_matrix",
    "ring",
    "spectral_gap",
    "star",
    "star_server_weights",
    "fedavg_weights",
    "summarize",
    "torus",
    "uniform_neighbourhood",
    "validate_mixing_matrix",
]


class TopologyError(ValueError):
    """A topology that cannot be built or used: bad name, peer count, file line, or a disconnected graph."""


class MixingMatrixError(TopologyError):
    """A mixing matrix that is not square, negative, not (doubly) stochastic, or off the graph."""


#: Fewest peers each topology makes sense for (the messages say why).
MIN_PEERS: dict[str, int] = {
    "ring": 3,  # 2 peers on a "ring" is one edge (degree 1, not 2): use "complete"
    "torus": 9,  # 3 x 3; a side of 2 folds the wrap-around onto the inner edge
    "exponential": 2,  # offsets 2^k for k <= log2(n - 1) need n - 1 >= 1
    "erdos_renyi": 1,
    "complete": 1,  # one peer: local training, W = [[1]]
    "star": 2,  # a server and at least one client
    "file": 1,
}

_WHY_MIN: dict[str, str] = {
    "ring": "with 2 peers use 'complete'",
    "torus": "it needs rows x cols with both >= 3",
    "exponential": "offsets 2^k need n >= 2",
    "star": "one server and at least one client",
}


# --------------------------------------------------------------------------------------------
# Graph builders
# --------------------------------------------------------------------------------------------


def _check_peers(topology: str, n: object) -> int:
    # bool is an int subclass; True peers is always a mistake.
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise TopologyError(f"topology {topology!r}: the peer count must be an integer, got {n!r}")
    n = int(n)
    least = MIN_PEERS[topology]
    if n < least:
        why = _WHY_MIN.get(topology)
        raise TopologyError(
            f"topology {topology!r} needs at least {least} peers, got {n}" + (f" ({why})" if why else "")
        )
    return n


def _graph(n: int, edges: Iterable[tuple[int, int]], topology: str, name: str, **attrs: Any) -> nx.Graph:
    graph = nx.Graph(name=name, topology=topology, **attrs)
    # Nodes first, in order, so iteration order == peer id order even for nodes added by edges.
    graph.add_nodes_from(range(n))
    graph.add_edges_from((u, v) for u, v in edges if u != v)
    return graph


def ring(n: int) -> nx.Graph:
    """Cycle ``0 - 1 - ... - n-1 - 0``: every peer talks to its two neighbours (degree 2).

    The sparsest connected regular topology; its spectral gap shrinks like ``1/n²``, so it is the
    slow end of the usual decentralized-SGD comparisons (Lian et al., 2017, "Can Decentralized
    Algorithms Outperform Centralized Algorithms?").
    """
    n = _check_peers("ring", n)
    return _graph(n, ((i, (i + 1) % n) for i in range(n)), "ring", f"ring({n})")


def _torus_shape(n: int) -> tuple[int, int] | None:
    # Largest rows <= sqrt(n) gives the most square factorisation (smallest diameter).
    for rows in range(math.isqrt(n), 2, -1):
        if n % rows == 0 and n // rows >= 3:
            return rows, n // rows
    return None


def torus(n: int, rows: int | None = None) -> nx.Graph:
    """2-D torus (a grid with wrap-around): peer ``r * cols + c`` talks to its 4 grid neighbours.

    ``n`` must factor as ``rows x cols`` with both ``>= 3`` (a side of 2 would make the up and
    down neighbours the same peer, so degrees drop to 3). Without ``rows`` the most square
    factorisation is used (``12 -> 3x4``, ``16 -> 4x4``), which minimises the diameter.
    Sets ``graph.graph["rows"]`` and ``["cols"]``.
    """
    n = _check_peers("torus", n)
    if rows is None:
        shape = _torus_shape(n)
        if shape is None:
            raise TopologyError(
                f"topology 'torus' needs n = rows x cols with rows, cols >= 3 (e.g. 9, 12, 15, 16); "
                f"{n} peers do not factor that way"
            )
        rows, cols = shape
    else:
        if isinstance(rows, bool) or not isinstance(rows, int | np.integer) or rows < 3 or n % rows or n // rows < 3:
            raise TopologyError(
                f"topology 'torus': rows={rows!r} does not split {n} peers into rows x cols with both >= 3"
            )
        rows, cols = int(rows), n // int(rows)
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            edges.append((i, r * cols + (c + 1) % cols))  # right, wrapping
            edges.append((i, ((r + 1) % rows) * cols + c))  # down, wrapping
    return _graph(n, edges, "torus", f"torus({rows}x{cols})", rows=rows, cols=cols)


def exponential(n: int) -> nx.Graph:
    """Static exponential graph: peer i talks to ``(i ± 2^k) mod n`` for ``k = 0..floor(log2(n-1))``.

    From Ying et al., 2021, "Exponential Graph is Provably Efficient for Decentralized Deep
    Training" (NeurIPS). Their graph is *directed* (``i -> i + 2^k``, each peer sends to
    ``⌈log2 n⌉`` peers) with weights ``1/(⌈log2 n⌉ + 1)``, which is doubly stochastic but not
    symmetric. We use the undirected version (both ``i + 2^k`` and ``i - 2^k``), so a link means
    two-way exchange and Metropolis–Hastings gives a *symmetric* doubly stochastic ``W``. It is a
    circulant, hence regular, graph of degree at most ``2 (floor(log2(n-1)) + 1)``: offsets that
    coincide mod n count once (``+n/2 = -n/2`` when n is a power of two, so degree 5 for
    ``n = 8``; ``+4 = -2`` for ``n = 6``, so degree 4).
    """
    n = _check_peers("exponential", n)
    # floor(log2(n - 1)) exactly, without float rounding.
    top = (n - 1).bit_length() - 1
    # Each undirected edge {i, i - 2^k} is also {j, j + 2^k} for j = i - 2^k, so "+" covers "±".
    edges = [(i, (i + (1 << k)) % n) for k in range(top + 1) for i in range(n)]
    return _graph(n, edges, "exponential", f"exponential({n})")


def erdos_renyi(n: int, p: float, seed: int = 0, max_tries: int = 100) -> nx.Graph:
    """Connected Erdős–Rényi graph G(n, p): each of the ``n(n-1)/2`` links exists with probability p.

    Erdős & Rényi, 1959, "On random graphs I" (the G(n, p) form is Gilbert's, 1959). A sample may
    be disconnected, which would leave peers that never agree, so seeds ``seed, seed + 1, ...``
    are tried (``max_tries`` in all) and the first connected sample is returned; the seed that
    produced it is ``graph.graph["seed"]`` (log it to reproduce the run). G(n, p) is connected
    with high probability once ``p > ln(n)/n``.
    """
    n = _check_peers("erdos_renyi", n)
    if isinstance(p, bool) or not isinstance(p, int | float | np.floating | np.integer) or not 0.0 <= p <= 1.0:
        raise TopologyError(f"topology 'erdos_renyi': p must be a probability in [0, 1], got {p!r}")
    if max_tries < 1:
        raise TopologyError(f"topology 'erdos_renyi': max_tries must be >= 1, got {max_tries}")
    for s in range(seed, seed + max_tries):
        sample = nx.gnp_random_graph(n, float(p), seed=s)
        if nx.is_connected(sample):
            return _graph(n, sample.edges, "erdos_renyi", f"erdos_renyi({n}, p={p:g}, seed={s})", p=float(p), seed=s)
    hint = f"; p > ln(n)/n = {math.log(n) / n:.3g} makes it likely" if n > 1 else ""
    raise TopologyError(
        f"topology 'erdos_renyi': no connected G(n={n}, p={p:g}) in {max_tries} tries "
        f"(seeds {seed}..{seed + max_tries - 1}); raise p{hint}"
    )


def complete(n: int) -> nx.Graph:
    """Every peer talks to every other peer (all-reduce). Uniform weights give ``W = J/n``: exact
    averaging in one round, spectral gap 1 — the centralized limit of gossip."""
    n = _check_peers("complete", n)
    return _graph(n, ((i, j) for i in range(n) for j in range(i + 1, n)), "complete", f"complete({n})")


def star(n: int) -> nx.Graph:
    """Star: peer 0 is the server, linked to clients ``1..n-1``; ``graph.graph["server"] == 0``.

    This is the federated layout ("one server, no data on it"), but gossip over it is *not*
    FedAvg. With Metropolis–Hastings weights the server row is ``1/n`` everywhere (it averages
    all peers *including its own, dataless, adapter*) and each client keeps ``1 − 1/n`` of its own
    value and takes only ``1/n`` from the server; ``W = I − L/n`` has eigenvalues
    ``1, 1 − 1/n (×(n−2)), 0``, so the spectral gap is ``1/n`` (slow). FedAvg instead does two hops
    per round — clients upload, the server averages the *clients only* and broadcasts — which is
    the rank-one matrix of :func:`star_server_weights` (gap 1, not doubly stochastic); d2ora's
    ``fedavg`` runs use it through :func:`fedavg_weights`.
    """
    n = _check_peers("star", n)
    return _graph(n, ((0, j) for j in range(1, n)), "star", f"star({n})", server=0)


def star_server_weights(n: int, client_weights: Sequence[float] | None = None) -> np.ndarray:
    """One FedAvg round over :func:`star`'s peers as a single ``(n, n)`` matrix.

    Every row (server and clients alike, since all receive the broadcast) is
    ``[0, w_1, ..., w_{n-1}]``: the server's own adapter gets weight 0 (it has no data) and client
    j gets ``w_j`` — ``client_weights`` normalised to sum 1 (McMahan et al., 2017,
    "Communication-Efficient Learning of Deep Networks from Decentralized Data", use the clients'
    sample counts), uniform ``1/(n−1)`` by default.

    This ``W`` is row-stochastic only (column 0 sums to 0) and uses two-hop links (client to
    client via the server), so :func:`validate_mixing_matrix` accepts it only with
    ``doubly_stochastic=False`` and no ``graph``. It reaches consensus in one round (gap 1).

    d2ora's ``fedavg`` runs keep the server *outside* their P peers (all P hold data): their
    round is :func:`fedavg_weights`, ``star_server_weights(P + 1, w)[1:, 1:]`` (every row = the
    client weights), i.e. ``J/P`` when unweighted — the uniform matrix of :func:`complete`.
    """
    n = _check_peers("star", n)
    if client_weights is None:
        w = np.full(n - 1, 1.0 / (n - 1))
    else:
        w = np.asarray(client_weights, dtype=np.float64)
        if w.shape != (n - 1,):
            raise MixingMatrixError(f"star_server_weights: need {n - 1} client weights, got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise MixingMatrixError("star_server_weights: client weights must be finite, >= 0, and not all 0")
        w = w / w.sum()
    out = np.zeros((n, n))
    out[:, 1:] = w
    return out


def fedavg_weights(shard_sizes: Sequence[float]) -> np.ndarray:
    """FedAvg's round for P data-holding peers and a server outside them, as a (P, P) matrix:
    every row is ``n_k / n`` (McMahan et al., 2017), what the server averages and sends back to
    each peer. The one place FedAvg's weights are computed."""
    peers = len(shard_sizes)
    return star_server_weights(peers + 1, shard_sizes)[1:, 1:]


def from_edge_list(path: str | os.PathLike[str], n: int | None = None) -> nx.Graph:
    """Read an undirected graph from a text file of ``u v`` lines (one link each).

    - ``#`` starts a comment (whole line or after the pair); blank lines are skipped.
    - ``u`` and ``v`` are peer ids: non-negative decimal integers; with ``n`` given they must be
      ``< n``, without it ``n`` is the largest id + 1. Every id in ``0..n-1`` must be in some
      edge, or the graph is not connected.
    - A self-loop ``i i`` is accepted and ignored: every peer always keeps its own self-weight
      ``W_ii``, so it adds nothing (it is still read as mentioning peer i). Repeated edges and
      both directions (``u v`` and ``v u``) are the same link.
    - Any other line is an error naming the file and line number.

    Raises :class:`TopologyError` for a bad line, an empty file, or a disconnected graph.
    """
    path = Path(path)
    if n is not None:
        n = _check_peers("file", n)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(f"edge-list file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"cannot read edge-list file {path}: {exc}") from None
    edges: list[tuple[int, int]] = []
    top = -1
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}, line {number}"
        if len(fields) != 2:
            raise TopologyError(f"{where}: expected two peer ids 'u v', got {line.strip()!r}")
        ids = []
        for field in fields:
            # isdecimal() rejects "-1", "1.0", "0x3" and "+2": ids are plain non-negative integers.
            if not field.isascii() or not field.isdecimal():
                raise TopologyError(f"{where}: peer id {field!r} is not a non-negative integer")
            ids.append(int(field))
        u, v = ids
        if n is not None and max(u, v) >= n:
            raise TopologyError(f"{where}: peer id {max(u, v)} is out of range for {n} peers (ids are 0..{n - 1})")
        top = max(top, u, v)
        edges.append((u, v))
    if not edges:
        raise TopologyError(f"edge-list file {path} has no edges")
    graph = _graph(top + 1 if n is None else n, edges, "file", f"file({path.name})", path=str(path))
    check_connected(graph)
    return graph


def check_connected(graph: nx.Graph) -> None:
    """Raise :class:`TopologyError` unless ``graph`` is connected: peers in another component
    would never hear from each other, so their adapters would never agree."""
    if graph.number_of_nodes() == 0:
        raise TopologyError(f"topology {_name(graph)!r} has no peers")
    if nx.is_connected(graph):
        return
    parts = sorted((sorted(c) for c in nx.connected_components(graph)), key=lambda c: c[0])
    sizes = ", ".join(str(len(c)) for c in parts)
    cut = parts[1][:8]
    cut_text = ", ".join(map(str, cut)) + (", ..." if len(parts[1]) > len(cut) else "")
    raise TopologyError(
        f"topology {_name(graph)!r} is not connected: {len(parts)} components (sizes {sizes}); "
        f"e.g. peers {cut_text} never hear from peer {parts[0][0]}"
    )


# --------------------------------------------------------------------------------------------
# Dispatch by name
# --------------------------------------------------------------------------------------------


def _file(n: int, path: str | os.PathLike[str]) -> nx.Graph:
    return from_edge_list(path, n=n)


_BUILDERS: dict[str, Callable[..., nx.Graph]] = {
    "ring": ring,
    "torus": torus,
    "exponential": exponential,
    "erdos_renyi": erdos_renyi,
    "complete": complete,
    "star": star,
    "file": _file,
}

#: Names :func:`build_topology` accepts.
TOPOLOGY_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_topology(name: str, n: int, **params: Any) -> nx.Graph:
    """Build topology ``name`` on ``n`` peers; ``params`` go to its builder.

    ``ring``, ``torus`` (``rows=``), ``exponential``, ``erdos_renyi`` (``p=``, ``seed=``,
    ``max_tries=``), ``complete``, ``star``, ``file`` (``path=``). Names are case-insensitive and
    ``-`` means ``_``. Raises one :class:`TopologyError` for an unknown name (listing the valid
    ones), a bad or missing parameter, a peer count the topology cannot take, or a graph that is
    not connected.
    """
    key = str(name).strip().lower().replace("-", "_")
    builder = _BUILDERS.get(key)
    if builder is None:
        raise TopologyError(f"unknown topology {name!r}; valid: {', '.join(TOPOLOGY_NAMES)}")
    accepted = list(inspect.signature(builder).parameters)[1:]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TopologyError(
            f"topology {key!r} takes no parameter {', '.join(map(repr, unknown))} "
            f"(accepted: {', '.join(accepted) or 'none'})"
        )
    try:
        inspect.signature(builder).bind(n, **params)
    except TypeError:
        missing = [
            p.name
            for p in list(inspect.signature(builder).parameters.values())[1:]
            if p.default is inspect.Parameter.empty and p.name not in params
        ]
        raise TopologyError(f"topology {key!r} needs parameter {', '.join(missing)}") from None
    graph = builder(n, **params)
    check_connected(graph)  # builders already guarantee it; this keeps the promise for any future one
    return graph


# --------------------------------------------------------------------------------------------
# Mixing weights
# --------------------------------------------------------------------------------------------


def _name(graph: nx.Graph) -> str:
    return graph.name or graph.graph.get("topology") or "graph"


def _adjacency(graph: nx.Graph) -> np.ndarray:
    """0/1 adjacency in peer-id order, without self-loops (W_ii is set by the rules themselves)."""
    if graph.is_directed():
        raise TopologyError(f"topology {_name(graph)!r}: mixing weights need an undirected graph")
    n = graph.number_of_nodes()
    if set(graph.nodes) != set(range(n)):
        odd = sorted((v for v in graph.nodes if v not in range(n)), key=repr)[:5]
        raise TopologyError(
            f"topology {_name(graph)!r}: nodes must be the peer ids 0..{n - 1}; got e.g. {odd} "
            "(relabel with nx.convert_node_labels_to_integers)"
        )
    adj = nx.to_numpy_array(graph, nodelist=range(n), weight=None, dtype=np.float64)
    adj = (adj != 0).astype(np.float64)
    np.fill_diagonal(adj, 0.0)
    return adj


def metropolis_hastings(graph: nx.Graph) -> np.ndarray:
    """Metropolis–Hastings weights: ``W_ij = 1 / (1 + max(deg_i, deg_j))`` on each edge,
    ``W_ii = 1 − Σ_{j≠i} W_ij``, 0 elsewhere.

    Xiao & Boyd, 2004, "Fast linear iterations for distributed averaging" (Systems & Control
    Letters 53). Symmetric and doubly stochastic on *any* undirected graph, non-negative with
    ``W_ii >= 1/(1 + deg_i)`` (so no eigenvalue −1 and gossip converges on every connected
    graph), and each peer needs only its neighbours' degrees. On a regular graph it equals
    :func:`uniform_neighbourhood`.
    """
    adj = _adjacency(graph)
    deg = adj.sum(axis=1)
    w = adj / (1.0 + np.maximum.outer(deg, deg))
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def uniform_neighbourhood(graph: nx.Graph) -> np.ndarray:
    """Equal weights over the closed neighbourhood: ``W_ij = 1/(deg_i + 1)`` for ``j = i`` or j a
    neighbour of i.

    Row-stochastic always; doubly stochastic (and symmetric) only on regular graphs (ring, torus,
    exponential, complete). On others column j sums to ``Σ_{i ∈ N[j]} 1/(deg_i + 1) ≠ 1``, the
    consensus value drifts towards low-degree peers' data, and :func:`mixing_matrix` refuses it
    unless ``allow_row_stochastic=True``.
    """
    adj = _adjacency(graph)
    closed = adj + np.eye(adj.shape[0])
    return closed / closed.sum(axis=1, keepdims=True)


_RULES: dict[str, Callable[[nx.Graph], np.ndarray]] = {
    "metropolis_hastings": metropolis_hastings,
    "uniform": uniform_neighbourhood,
}

#: Rules :func:`mixing_matrix` accepts.
MIXING_RULES: tuple[str, ...] = tuple(_RULES)


def mixing_matrix(
    graph: nx.Graph, rule: str = "metropolis_hastings", *, allow_row_stochastic: bool = False
) -> np.ndarray:
    """The ``(n, n)`` float64 mixing matrix of ``graph`` under ``rule``, validated.

    By default ``W`` must be doubly stochastic (rows *and* columns sum to 1) so gossip preserves
    the peers' average: ``"uniform"`` on a non-regular graph is then a :class:`MixingMatrixError`
    naming the first bad column. ``allow_row_stochastic=True`` accepts it (consensus then lands
    on a degree-weighted average instead of the plain one).
    """
    key = str(rule).strip().lower().replace("-", "_")
    make = _RULES.get(key)
    if make is None:
        raise MixingMatrixError(f"unknown mixing rule {rule!r}; valid: {', '.join(MIXING_RULES)}")
    w = make(graph)
    try:
        validate_mixing_matrix(w, graph, doubly_stochastic=not allow_row_stochastic)
    except MixingMatrixError as exc:
        degrees = [d for _, d in graph.degree]
        raise MixingMatrixError(
            f"rule {key!r} on {_name(graph)!r} (degrees {min(degrees)}..{max(degrees)}): {exc}; "
            "use rule='metropolis_hastings' for a doubly stochastic W, or allow_row_stochastic=True"
        ) from None
    return w


def validate_mixing_matrix(
    W: ArrayLike,
    graph: nx.Graph | None = None,
    *,
    atol: float | None = None,
    doubly_stochastic: bool = True,
) -> np.ndarray:
    """Check ``W`` and return it as a float64 array; raise :class:`MixingMatrixError` otherwise.

    Checks, in order: 2-D and square; finite; non-negative (first negative entry named); the
    size and support match ``graph`` when given (``W_ij`` must be exactly 0 where ``i ≠ j`` share
    no edge — exactly, because mixers treat any nonzero as a link); every row sums to 1; with
    ``doubly_stochastic`` every column too. The first offending row/column and its sum are named.

    ``atol`` defaults to ``1e-10`` for float64 input and ``1e-6`` for lower precision (a float32
    ``1/3`` alone is off by ``1e-8``). Accepts numpy arrays, nested lists and CPU torch tensors.
    """
    raw = np.asarray(W)
    if atol is None:
        atol = 1e-10 if raw.dtype == np.float64 or raw.dtype.kind in "iub" else 1e-6
    w = raw.astype(np.float64, copy=False)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise MixingMatrixError(f"mixing matrix must be square (P, P), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        i, j = np.argwhere(~np.isfinite(w))[0]
        raise MixingMatrixError(f"mixing matrix entry [{i}, {j}] is {w[i, j]} (must be finite)")
    if np.any(w < 0):
        i, j = np.argwhere(w < 0)[0]
        raise MixingMatrixError(f"mixing matrix entry [{i}, {j}] is {w[i, j]:.6g} (must be >= 0)")
    if graph is not None:
        adj = _adjacency(graph)
        if adj.shape != w.shape:
            raise MixingMatrixError(
                f"mixing matrix is {w.shape[0]}x{w.shape[1]} but topology {_name(graph)!r} has {adj.shape[0]} peers"
            )
        off = (w != 0) & (adj == 0)
        np.fill_diagonal(off, False)
        if np.any(off):
            i, j = np.argwhere(off)[0]
            raise MixingMatrixError(
                f"mixing matrix entry [{i}, {j}] is {w[i, j]:.6g} but peers {i} and {j} share no edge (must be 0)"
            )
    rows = w.sum(axis=1)
    bad = np.flatnonzero(np.abs(rows - 1.0) > atol)
    if bad.size:
        raise MixingMatrixError(f"mixing matrix row {bad[0]} sums to {rows[bad[0]]:.12g} (must be 1 within {atol:g})")
    if doubly_stochastic:
        cols = w.sum(axis=0)
        bad = np.flatnonzero(np.abs(cols - 1.0) > atol)
        if bad.size:
            raise MixingMatrixError(
                f"mixing matrix is not doubly stochastic: column {bad[0]} sums to {cols[bad[0]]:.12g} "
                f"(must be 1 within {atol:g})"
            )
    return w


def spectral_gap(W: ArrayLike) -> float:
    """``1 − |λ₂(W)|``, where ``|λ₂|`` is the second-largest eigenvalue modulus.

    For a symmetric doubly stochastic ``W``, ``‖W^t x − x̄‖ ≤ (1 − gap)^t ‖x − x̄‖`` (Xiao & Boyd,
    2004): 0 means no mixing (a disconnected graph, or a bipartite one with an eigenvalue −1),
    1 means exact averaging in one round. Symmetric ``W`` uses ``numpy.linalg.eigvalsh`` (real,
    stable); others use ``eigvals`` and moduli, where the gap gives the asymptotic rate only.
    A ``1x1`` matrix (a single peer) has gap 1.
    """
    w = np.asarray(W, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
        raise MixingMatrixError(f"spectral_gap needs a non-empty square matrix, got shape {w.shape}")
    if w.shape[0] == 1:
        return 1.0
    if np.allclose(w, w.T, rtol=0.0, atol=1e-12):
        moduli = np.abs(np.linalg.eigvalsh(w))
    else:
        moduli = np.abs(np.linalg.eigvals(w))
    moduli = np.sort(moduli)[::-1]
    return float(1.0 - moduli[1])


# --------------------------------------------------------------------------------------------
# One line for the log
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopologySummary:
    """What to print at start: ``str(summary)`` is one line."""

    name: str
    peers: int
    edges: int
    min_degree: int
    max_degree: int
    spectral_gap: float
    server: int | None = None

    def __str__(self) -> str:
        degree = (
            f"degree {self.min_degree}"
            if self.min_degree == self.max_degree
            else f"degree {self.min_degree}..{self.max_degree}"
        )
        server = f", server peer {self.server}" if self.server is not None else ""
        return (
            f"topology {self.name}: {self.peers} peers, {self.edges} edges, {degree}, "
            f"spectral gap {self.spectral_gap:.4g}{server}"
        )


def summarize(graph: nx.Graph, W: ArrayLike | None = None) -> TopologySummary:
    """Counts, degrees and the spectral gap of ``W`` (Metropolis–Hastings weights when None)."""
    w = metropolis_hastings(graph) if W is None else np.asarray(W, dtype=np.float64)
    # Degrees without self-loops, matching the mixing rules (a foreign graph might carry some).
    adj = _adjacency(graph)
    degrees = adj.sum(axis=1).astype(int) if adj.size else np.zeros(1, dtype=int)
    return TopologySummary(
        name=_name(graph),
        peers=graph.number_of_nodes(),
        edges=int(adj.sum()) // 2,
        min_degree=int(degrees.min()),
        max_degree=int(degrees.max()),
        spectral_gap=spectral_gap(w),
        server=graph.graph.get("server"),
    )


def describe(graph: nx.Graph, W: ArrayLike | None = None) -> str:
    """One line for the start of a run, e.g.
    ``topology ring(8): 8 peers, 8 edges, degree 2, spectral gap 0.1953``."""
    return str(summarize(graph, W))
