"""The ``sft`` task: supervised fine-tuning of a causal LM on chat turns (:mod:`d2ora.data.sft`).

It is :class:`~d2ora.data.tasks.CausalLMTask` with other targets: the loss (per peer, the mean
cross-entropy over that peer's target tokens of a peer-major batch) is the causal task's own,
over ``labels`` that are ``-100`` on every token but the assistant's (or, with
``train_on_prompt``, on padding only). The metric is ``answer_perplexity``: exp of the mean NLL
over every answer token of a split, whatever ``train_on_prompt`` trains on. Next to it,
``generative_accuracy``: the share of the first ``generate_examples`` examples whose greedy answer
matches the reference after normalisation (:mod:`d2ora.data.generation`). The model loads as a
causal LM (``d2ora.models.load_model`` maps ``sft`` to ``AutoModelForCausalLM``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from d2ora.data.generation import GENERATIVE_ACCURACY, generate_answers, prompts_and_answers
from d2ora.data.sft import ANSWER_LABELS, MESSAGES, ROW_ID, tokenize_sft
from d2ora.data.sources import LABELS, DataSourceError
from d2ora.data.tasks import (
    CLASS_LABELS,
    IGNORE_INDEX,
    INPUT_KEYS,
    Batch,
    CausalLMTask,
    TaskName,
    pad_sequences,
)

SFT: TaskName = "sft"
ANSWER_PERPLEXITY = "answer_perplexity"


@dataclass
class SFTTask(CausalLMTask):
    """Chat SFT: loss on assistant tokens (all tokens with ``train_on_prompt``); answer perplexity."""

    train_on_prompt: bool = False
    name: TaskName = SFT
    metric: str = ANSWER_PERPLEXITY
    #: examples :meth:`tokenize` dropped because ``max_length`` cut off their whole answer, per call
    dropped: list[int] = field(default_factory=list)
    #: examples per evaluation answered by greedy decoding (0: no generative accuracy); generation
    #: is one forward per new token, so on a CPU it is capped (``run.generate_examples``)
    generate_examples: int = 16
    #: the tokenizer the collator pads with, kept to decode generated answers (set by :meth:`collator`:
    #: evaluation batches always come from it, so generation decodes with the tokenizer that encoded them)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def tokenize(self, dataset: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        if MESSAGES not in dataset.column_names:
            raise DataSourceError(f"sft needs a '{MESSAGES}' column (d2ora.data.sft.load_sft_source); columns are {dataset.column_names}")
        if LABELS in dataset.column_names:  # class labels stay for label-skewed partitions, out of the model's way
            dataset = dataset.rename_column(LABELS, CLASS_LABELS)
        keep = [c for c in (CLASS_LABELS, ROW_ID) if c in dataset.column_names]
        tokenised, dropped = tokenize_sft(dataset, tokenizer, max_length, keep=keep)
        self.dropped.append(dropped)
        return tokenised

    def dropped_line(self) -> str | None:
        """One line on the examples dropped so far, or None when none were."""
        total = sum(self.dropped)
        if total == 0:
            return None
        return f"sft: {total} example(s) dropped: max_length cut off their whole answer (per tokenised split: {', '.join(map(str, self.dropped))})"

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], Batch]:
        causal = super().collator(tokenizer)  # pads the inputs; its labels are every real token
        self.tokenizer = tokenizer

        def collate(features: list[dict[str, Any]]) -> Batch:
            batch = causal([{k: f[k] for k in INPUT_KEYS} for f in features])
            answers = pad_sequences([f[ANSWER_LABELS] for f in features], IGNORE_INDEX)
            if self.train_on_prompt:
                batch[ANSWER_LABELS] = answers  # evaluation still scores the answers alone
            else:
                batch[LABELS] = answers
            return batch

        return collate

    def loss_metrics_only(self) -> SFTTask:
        """A copy that answers no examples greedily (answer perplexity alone); it shares this task's
        tokenizer and drop counts."""
        return replace(self, generate_examples=0)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> dict[str, float]:
        def answer_targets() -> Iterator[Batch]:
            for batch in batches:
                yield {**batch, LABELS: batch[ANSWER_LABELS]} if ANSWER_LABELS in batch else batch

        batches = list(batches)  # read twice: perplexity, then the generation prompts
        scores = super().evaluate(model, answer_targets(), device)
        out = {ANSWER_PERPLEXITY: scores.pop("perplexity"), **scores}
        if self.tokenizer is not None and self.generate_examples > 0 and hasattr(model, "generate"):
            items = prompts_and_answers(batches, self.generate_examples)
            if items:
                out[GENERATIVE_ACCURACY] = generate_answers(model, self.tokenizer, items, device=device).accuracy
        return out
