"""Split one labelled data set among simulated peers: IID, Dirichlet label skew, or k labels per peer.

Pure functions over a plain integer label array (e.g. ``np.asarray(dataset["labels"])``), so they
work for any source and never touch text or a tokeniser. Randomness comes only from a
:class:`numpy.random.Generator` seeded by ``seed``: the same call always gives the same result.

Conventions shared by every partitioner here:

- the result is a ``list`` of ``n_peers`` index arrays (``np.int64``) into the original labels /
  data set (use with ``dataset.select(part)``);
- the parts are a *partition*: every example is in exactly one part (nothing is dropped);
- each part is **sorted ascending** (a canonical form: equal partitions compare equal element by
  element, and Arrow reads sorted indices faster). Shuffling for training is the data loader's job;
- bad arguments raise :class:`PartitionError` (a :class:`ValueError`) naming the offending value.

Schemes (``partition(..., scheme=...)``):

- ``"iid"``: a seeded shuffle cut into near-equal parts (sizes differ by at most 1);
- ``"dirichlet"``: label skew controlled by ``alpha`` (small = each peer sees few classes, large =
  close to IID), see :func:`dirichlet_partition`;
- ``"k_labels"``: each peer holds exactly ``k`` classes (pathological non-IID), see
  :func:`k_labels_partition`;
- ``"by_source"``: the array holds each example's *source* (the file it came from, 0..n_peers-1)
  instead of a class, and peer ``k`` takes exactly the examples of source ``k``, see
  :func:`source_partition` (one file per peer, ``data.peer_sources``).

Any integer column can stand for the class: a ``domain`` / ``category`` column of instruction data
is dealt by ``dirichlet`` or ``k_labels`` exactly as class labels are.

Diagnostics: :func:`label_counts` (peers x classes), :func:`label_skew` (mean total-variation
distance to the global label distribution: 0 for the global mix, ``1 - p_c`` for a peer holding only
class ``c``)
and :func:`format_label_table` (a ``rich`` table to print at the start of a run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # rich is imported only when a table is built
    from rich.table import Table

SCHEMES = ("iid", "dirichlet", "k_labels", "by_source")

# Parameters each scheme accepts through :func:`partition` (besides labels, n_peers, seed).
_SCHEME_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_size", "max_tries"),
    "k_labels": ("k",),
    "by_source": (),
}


class PartitionError(ValueError):
    """Arguments that cannot give a valid partition (unknown scheme, bad parameter, impossible constraint)."""


# ------------------------------------------------------------------------------------------ helpers
def _as_labels(labels: Any) -> np.ndarray:
    """A 1-D array of non-negative integer class ids (lists and integral arrays accepted)."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array of class ids, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise PartitionError(f"labels must be integer class ids, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise PartitionError(f"labels must be non-negative class ids, got minimum {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PartitionError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_peers(n_peers: Any, n_examples: int) -> int:
    n_peers = _check_int("n_peers", n_peers)
    if n_peers < 1:
        raise PartitionError(f"n_peers must be at least 1, got {n_peers}")
    if n_peers > n_examples:
        raise PartitionError(f"n_peers={n_peers} is more than the {n_examples} examples: some peer would get none")
    return n_peers


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# --------------------------------------------------------------------------------------------- IID
def iid_partition(n_examples: int, n_peers: int, seed: int) -> list[np.ndarray]:
    """``n_peers`` disjoint random shards of ``range(n_examples)``, sizes differing by at most 1.

    A seeded permutation cut into consecutive near-equal pieces (the first ``n_examples % n_peers``
    shards get one extra example). Each shard is returned sorted ascending.
    """
    n_examples = _check_int("n_examples", n_examples)
    if n_examples < 0:
        raise PartitionError(f"n_examples must be non-negative, got {n_examples}")
    n_peers = _check_peers(n_peers, n_examples)
    rng = np.random.default_rng(seed)
    return _finish(np.array_split(rng.permutation(n_examples), n_peers))


# ---------------------------------------------------------------------------------------- Dirichlet
def dirichlet_partition(
    labels: np.ndarray,
    n_peers: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed shards: each class is split among the peers by proportions drawn from Dir(alpha).

    For every class c (in increasing id order), its indices are shuffled and cut into ``n_peers``
    consecutive pieces with sizes ``floor(cumsum(p) * n_c)``, where ``p ~ Dirichlet(alpha * 1_N)``
    is drawn afresh for that class. If some peer ends with fewer than ``min_size`` examples the
    whole draw is repeated, continuing the same RNG stream (so the result is still a pure function
    of ``seed``), up to ``max_tries`` draws.

    ``alpha`` controls the skew: ``alpha -> inf`` gives every peer the global class mix (IID-like),
    ``alpha -> 0`` gives each class to a single peer. Typical values: 100 (mild), 1, 0.5, 0.1
    (strong).

    Source: Dirichlet label skew was introduced for federated learning by Hsu, Qi & Brown (2019),
    "Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification"
    (arXiv:1909.06335), who draw each *client's* class mix ``q ~ Dir(alpha * p_global)``. This
    function implements the per-*class* variant that most libraries ship under that name (Yurochkin
    et al. 2019; Li et al. 2022, "Federated Learning on Non-IID Data Silos: An Experimental Study",
    NIID-Bench; FedLab ``hetero_dir_partition``; Flower Datasets ``DirichletPartitioner`` with its
    default ``self_balancing=False`` and ``min_partition_size=10``): per class, proportions over
    peers ``~ Dir(alpha * 1_N)``, resampled until every peer has ``min_size`` examples. Both use
    ``alpha`` the same way; unlike Hsu et al., shard sizes here are not fixed and vary with the draw.

    Raises :class:`PartitionError` if ``alpha`` is not a finite positive number, if
    ``min_size * n_peers`` exceeds the number of examples (never satisfiable), or if ``max_tries``
    draws all leave some peer below ``min_size`` (the message gives the smallest size reached; use
    a larger ``alpha``, a smaller ``min_size`` or fewer peers).
    """
    labels = _as_labels(labels)
    n = labels.size
    n_peers = _check_peers(n_peers, n)
    alpha = _check_alpha(alpha)
    min_size = _check_int("min_size", min_size)
    max_tries = _check_int("max_tries", max_tries)
    if min_size < 0:
        raise PartitionError(f"min_size must be non-negative, got {min_size}")
    if max_tries < 1:
        raise PartitionError(f"max_tries must be at least 1, got {max_tries}")
    if min_size * n_peers > n:
        raise PartitionError(
            f"dirichlet partition impossible: min_size={min_size} x n_peers={n_peers} = {min_size * n_peers} "
            f"is more than the {n} examples (alpha={alpha}); lower min_size or use fewer peers"
        )

    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(n_peers, alpha)
    best = -1
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_peers)]
        for idx in class_indices:
            shuffled = rng.permutation(idx)
            proportions = _dirichlet(rng, concentration)
            cuts = (np.cumsum(proportions) * len(shuffled)).astype(np.int64)[:-1]
            for peer, piece in enumerate(np.split(shuffled, cuts)):
                parts[peer].append(piece)
        shards = [np.concatenate(p) for p in parts]
        smallest = min(len(s) for s in shards)
        if smallest >= min_size:
            return _finish(shards)
        best = max(best, smallest)
    raise PartitionError(
        f"dirichlet partition failed: after max_tries={max_tries} draws with alpha={alpha}, n_peers={n_peers}, "
        f"the smallest peer reached at best {best} examples, below min_size={min_size}; "
        "use a larger alpha, a smaller min_size, fewer peers or more max_tries"
    )


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise PartitionError(f"alpha must be a positive number, got {alpha!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise PartitionError(f"alpha must be a finite number > 0, got {alpha}")
    return alpha


def _dirichlet(rng: np.random.Generator, concentration: np.ndarray) -> np.ndarray:
    """One Dirichlet draw, guarded against the degenerate output tiny concentrations can give."""
    p = rng.dirichlet(concentration)
    total = p.sum()
    if not np.all(np.isfinite(p)) or total <= 0:  # alpha -> 0 limit: everything on one peer
        p = np.zeros_like(concentration)
        p[rng.integers(len(p))] = 1.0
        return p
    return p / total


# ---------------------------------------------------------------------------------- k labels per peer
def k_labels_partition(labels: np.ndarray, n_peers: int, k: int, seed: int) -> list[np.ndarray]:
    """Pathological non-IID: every peer holds examples of exactly ``k`` distinct classes.

    After McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks from
    Decentralized Data" (each client gets a few label-sorted shards, hence ~2 classes), but with an
    exact guarantee instead of shards: the present classes are put in a seeded random order and
    repeated cyclically; peer ``j`` (in a seeded random peer order) takes the ``k`` consecutive
    classes at positions ``j*k .. j*k+k-1``. Since ``k <= C`` those ``k`` are distinct, every class
    is used, and each class is held by ``floor(N*k/C)`` or ``ceil(N*k/C)`` peers. Each class's
    examples are then shuffled and split evenly (sizes differing by at most 1) among its holders.
    Shard sizes therefore differ across peers only through class sizes and holder counts.

    Classes are those that occur in ``labels`` (ids with no examples are ignored).

    Errors (:class:`PartitionError`): ``k < 1``; ``k`` above the number of classes; ``n_peers * k``
    below the number of classes -- decided as an error rather than allowed, because the classes
    nobody holds would have to be dropped and the result would no longer cover every example (use
    more peers or a larger ``k``); a class with fewer examples than peers holding it (some holder
    would get none of it and see fewer than ``k`` classes).
    """
    labels = _as_labels(labels)
    n_peers = _check_peers(n_peers, labels.size)
    k = _check_int("k", k)
    classes = np.unique(labels)
    n_classes = len(classes)
    if k < 1:
        raise PartitionError(f"k (labels per peer) must be at least 1, got {k}")
    if k > n_classes:
        raise PartitionError(f"k={k} labels per peer is more than the {n_classes} classes in the data")
    if n_peers * k < n_classes:
        raise PartitionError(
            f"k_labels: n_peers={n_peers} x k={k} = {n_peers * k} class slots cannot cover the {n_classes} classes; "
            "some class would be unused and its examples dropped -- use more peers or a larger k"
        )

    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    slots = np.resize(order, n_peers * k).reshape(n_peers, k)  # cyclic repetition, k per peer
    peer_order = rng.permutation(n_peers)  # which peer takes which window of classes
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for window, peer in zip(slots, peer_order):
        for c in window:
            holders[int(c)].append(int(peer))

    parts: list[list[np.ndarray]] = [[] for _ in range(n_peers)]
    for c in classes:
        idx = np.flatnonzero(labels == c)
        peers = holders[int(c)]
        if len(idx) < len(peers):
            raise PartitionError(
                f"k_labels: class {int(c)} has {len(idx)} examples but {len(peers)} peers hold it; "
                "each would need at least one -- use fewer peers or a smaller k"
            )
        for peer, piece in zip(peers, np.array_split(rng.permutation(idx), len(peers))):
            parts[peer].append(piece)
    return _finish([np.concatenate(p) for p in parts])


# ------------------------------------------------------------------------------------ one source per peer
def source_partition(sources: np.ndarray, n_peers: int) -> list[np.ndarray]:
    """Peer ``k`` holds exactly the examples whose source id is ``k`` (the examples read from its
    own file): no randomness, nothing shared. Every id must be below ``n_peers`` and every peer must
    have at least one example (:class:`PartitionError` otherwise, naming the peer)."""
    sources = _as_labels(sources)
    n_peers = _check_int("n_peers", n_peers)
    if n_peers < 1:
        raise PartitionError(f"n_peers must be at least 1, got {n_peers}")
    if sources.size and sources.max() >= n_peers:
        raise PartitionError(f"by_source: source id {int(sources.max())} but only {n_peers} peers (one source per peer)")
    parts = [np.flatnonzero(sources == k) for k in range(n_peers)]
    empty = [k for k, part in enumerate(parts) if part.size == 0]
    if empty:
        raise PartitionError(f"by_source: peer {empty[0]}'s source has no training examples (after the test split and tokenising)")
    return _finish(parts)


# ------------------------------------------------------------------------------------------ dispatch
def partition(labels: np.ndarray, n_peers: int, scheme: str, seed: int, **params: Any) -> list[np.ndarray]:
    """Partition by name: ``"iid"``, ``"dirichlet"`` (``alpha``, optional ``min_size``, ``max_tries``),
    ``"k_labels"`` (``k``) or ``"by_source"`` (``labels`` are then source ids). Scheme names are case-insensitive; ``-`` may stand for ``_``.

    One :class:`PartitionError` for an unknown scheme, a missing / unknown parameter, or a bad value
    (``alpha <= 0``, ``n_peers < 1`` or more peers than examples, ...).
    """
    labels = _as_labels(labels)
    name = str(scheme).strip().lower().replace("-", "_")
    if name not in _SCHEME_PARAMS:
        raise PartitionError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    allowed = _SCHEME_PARAMS[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        accepts = ", ".join(allowed) if allowed else "no parameters"
        raise PartitionError(f"partition scheme '{name}' got unknown parameter(s) {', '.join(unknown)}; it accepts {accepts}")
    if name == "by_source":
        return source_partition(labels, n_peers)
    _check_peers(n_peers, labels.size)
    if name == "iid":
        return iid_partition(labels.size, n_peers, seed)
    if name == "dirichlet":
        if "alpha" not in params:
            raise PartitionError("partition scheme 'dirichlet' needs alpha (e.g. alpha=0.5)")
        return dirichlet_partition(labels, n_peers, seed=seed, **params)
    if "k" not in params:
        raise PartitionError("partition scheme 'k_labels' needs k (labels per peer, e.g. k=2)")
    return k_labels_partition(labels, n_peers, params["k"], seed)


# ------------------------------------------------------------------------------------- local split
def split_local(indices: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one peer's shard into (train, validation) index arrays, both sorted ascending.

    The validation size is ``round(len * val_fraction)``, but at least 1 when ``val_fraction > 0``
    and the shard has at least 2 examples, and never the whole shard (at least 1 training example
    is kept). A shard of 0 or 1 examples, or ``val_fraction == 0``, gives an empty validation set.
    The choice is a seeded random sample (not stratified); use a different seed per peer (e.g.
    ``seed + peer``) so peers do not draw correlated positions.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise PartitionError(f"indices must be a 1-D integer array, got shape {idx.shape}, dtype {idx.dtype}")
    if isinstance(val_fraction, bool) or not (0 <= float(val_fraction) < 1):
        raise PartitionError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    idx = idx.astype(np.int64, copy=False)
    n = idx.size
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, round(n * float(val_fraction))), n - 1)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(idx)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


# -------------------------------------------------------------------------------------- diagnostics
def label_counts(labels: np.ndarray, parts: Sequence[np.ndarray], n_classes: int | None = None) -> np.ndarray:
    """Examples of each class in each part: an ``(n_peers, n_classes)`` ``np.int64`` array.

    ``n_classes`` defaults to ``max(label) + 1``; pass it to keep columns for classes that are absent.
    """
    labels = _as_labels(labels)
    if n_classes is None:
        n_classes = int(labels.max()) + 1 if labels.size else 0
    n_classes = _check_int("n_classes", n_classes)
    if labels.size and n_classes <= labels.max():
        raise PartitionError(f"n_classes={n_classes} but labels go up to {int(labels.max())}")
    counts = np.zeros((len(parts), n_classes), dtype=np.int64)
    for row, part in enumerate(parts):
        part = np.asarray(part, dtype=np.int64)
        counts[row] = np.bincount(labels[part], minlength=n_classes)
    return counts


def label_skew(counts: np.ndarray) -> float:
    """Mean, over peers with any examples, of the total-variation distance between that peer's label
    distribution and the global one (the column sums): ``mean_j 0.5 * sum_c |p_jc - p_c|``.

    0 means every peer has exactly the global mix; a peer holding only class ``c`` scores
    ``1 - p_c`` (0.8 for 5 balanced classes). Unweighted (each peer counts once, whatever its
    size); peers with no examples are left out.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise PartitionError(f"counts must be a 2-D (peers x classes) array, got shape {counts.shape}")
    sizes = counts.sum(axis=1)
    total = sizes.sum()
    if total <= 0:
        raise PartitionError("counts are all zero: no label distribution to compare")
    global_p = counts.sum(axis=0) / total
    nonempty = sizes > 0
    local_p = counts[nonempty] / sizes[nonempty, None]
    return float(np.mean(0.5 * np.abs(local_p - global_p).sum(axis=1)))


def format_label_table(counts: np.ndarray, class_names: Sequence[str] | None = None, title: str | None = None) -> Table:
    """A ``rich`` table of ``counts``: one row per peer, a column per class and a ``total`` column;
    the footer holds the per-class totals over all peers, and the caption the :func:`label_skew`."""
    from rich.table import Table

    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise PartitionError(f"counts must be a 2-D (peers x classes) array, got shape {counts.shape}")
    n_classes = counts.shape[1]
    if class_names is None:
        class_names = [str(c) for c in range(n_classes)]
    if len(class_names) != n_classes:
        raise PartitionError(f"{len(class_names)} class names for {n_classes} count columns")
    caption = f"label skew (mean TV distance to global): {label_skew(counts):.3f}" if counts.sum() > 0 else None
    table = Table(title=title or "examples per peer and class", caption=caption, show_footer=True)
    table.add_column("peer", footer="all", justify="right")
    for name, total in zip(class_names, counts.sum(axis=0)):
        table.add_column(str(name), footer=str(int(total)), justify="right")
    table.add_column("total", footer=str(int(counts.sum())), justify="right", style="bold")
    for peer, row in enumerate(counts):
        table.add_row(str(peer), *(str(int(v)) for v in row), str(int(row.sum())))
    return table


__all__ = [
    "SCHEMES",
    "PartitionError",
    "dirichlet_partition",
    "format_label_table",
    "iid_partition",
    "k_labels_partition",
    "label_counts",
    "label_skew",
    "partition",
    "source_partition",
    "split_local",
]
