"""Data: raw text sources (:mod:`d2ora.data.sources`) and tasks over them (:mod:`d2ora.data.tasks`)."""

from d2ora.data.sources import (
    BBC_NEWS,
    LABELS,
    TEXT,
    DataSourceError,
    encode_labels,
    load_bbc_news,
    load_source,
    split_dataset,
    split_indices,
    subsample,
)
from d2ora.data.tasks import (
    IGNORE_INDEX,
    CausalLMTask,
    ClassificationTask,
    Task,
    TaskName,
    causal_lm_labels,
    make_task,
    perplexity,
    token_nll_sum,
)

__all__ = [
    "BBC_NEWS",
    "IGNORE_INDEX",
    "LABELS",
    "TEXT",
    "CausalLMTask",
    "ClassificationTask",
    "DataSourceError",
    "Task",
    "TaskName",
    "causal_lm_labels",
    "encode_labels",
    "load_bbc_news",
    "load_source",
    "make_task",
    "perplexity",
    "split_dataset",
    "split_indices",
    "subsample",
    "token_nll_sum",
]
