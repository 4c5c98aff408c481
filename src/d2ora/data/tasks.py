"""Tasks: how raw text becomes model inputs, how batches are padded, and how a model is scored.

Two tasks share one interface (:class:`Task`):

- :class:`ClassificationTask`: one label per text; metric accuracy. The tokenised dataset keeps
  the ``labels`` ClassLabel column, so per-example labels stay readable (``ds["labels"]``), e.g.
  for a simulator that deals examples to peers by label.
- :class:`CausalLMTask`: next-token prediction on the text; metric perplexity, computed as
  ``exp(mean NLL over every non-padding target token)`` of the whole split (token-weighted, not a
  mean of per-batch means). Class labels, when the raw data has them, are kept as ``class_labels``.

Batches are padded on the right to the longest example in the batch (dynamic padding: short
texts cost no compute for padding they do not need).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset
from torch import nn

from d2ora.data.losses import peer_token_nll
from d2ora.data.sources import LABELS, TEXT, DataSourceError

TaskName = Literal["classification", "causal_lm", "sft"]  # sft: d2ora.data.sft_task
IGNORE_INDEX = -100  # positions the loss skips (PyTorch's and transformers' convention)
INPUT_KEYS = ("input_ids", "attention_mask")
CLASS_LABELS = "class_labels"

Batch = dict[str, torch.Tensor]


def pad_sequences(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad integer lists to the longest one: ``(len(rows), max_len)`` long tensor."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _pad_inputs(features: list[dict[str, Any]], pad_token_id: int) -> Batch:
    input_ids = pad_sequences([f["input_ids"] for f in features], pad_token_id)
    attention_mask = pad_sequences([f["attention_mask"] for f in features], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token (Llama ships no pad)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:  # Llama-style tokenisers ship no pad token
        return int(tokenizer.eos_token_id)
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")


def _to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _model_inputs(batch: Batch) -> Batch:
    return {k: batch[k] for k in INPUT_KEYS}


class Task(ABC):
    """Tokenisation, batching, training loss and evaluation of one kind of problem."""

    name: TaskName
    peft_task_type: str  # PEFT's ``task_type`` for adapter_config.json
    metric: str  # the headline metric in metrics.json
    higher_is_better: bool

    @abstractmethod
    def tokenize(self, dataset: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        """Model inputs (``input_ids``, ``attention_mask``) plus what the task keeps per example."""

    @abstractmethod
    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], Batch]:
        """A ``DataLoader`` ``collate_fn`` padding tokenised examples into a batch."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Training loss of one batch (mean over its examples / target tokens)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> dict[str, float]:
        """Metrics over every batch; the model is put in eval mode and then restored."""

    def loss_metrics_only(self) -> Task:
        """This task scoring its loss-based metrics alone (no greedy generation): itself unless it
        generates (:class:`~d2ora.data.sft_task.SFTTask`)."""
        return self

    @abstractmethod
    def peer_losses(self, model: nn.Module, batch: Batch, peers: int) -> torch.Tensor:
        """``(peers,)`` training losses of a peer-major batch (rows ``[k·b, (k+1)·b)`` are peer k's),
        each the mean over that peer's own examples / target tokens, exactly as :meth:`loss` on
        the peer's rows alone. Their sum has each peer's own gradient in that peer's parameters."""

    def peer_loss_units(self, batch: Batch, peers: int) -> torch.Tensor:
        """``(peers,)`` how many terms each peer's mean in :meth:`peer_losses` averages over: its
        examples here. Gradient accumulation weights each micro-batch's losses by these, so the
        accumulated loss is the mean over every term of the step; a task whose loss is a mean over
        tokens overrides this with its target-token counts (as :class:`CausalLMTask` does)."""
        rows = batch["input_ids"].shape[0]
        return torch.full((peers,), rows // peers, dtype=torch.float64)


@dataclass
class ClassificationTask(Task):
    """Sequence classification into ``label_names`` (ids are positions in that list)."""

    label_names: list[str]
    name: TaskName = "classification"
    peft_task_type: str = "SEQ_CLS"
    metric: str = "accuracy"
    higher_is_better: bool = True

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> ClassificationTask:
        feature = dataset.features.get(LABELS)
        names = feature.names if isinstance(feature, ClassLabel) else None
        if not names:
            raise DataSourceError(f"classification needs a '{LABELS}' ClassLabel column; columns are {dataset.column_names}")
        return cls(label_names=list(names))

    def tokenize(self, dataset: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        def encode(batch: dict[str, list]) -> dict[str, list]:
            # No token_type_ids: single texts need none, and Llama-style models reject them.
            return tokenizer(batch[TEXT], truncation=True, max_length=max_length, return_token_type_ids=False)

        drop = [c for c in dataset.column_names if c != LABELS]
        return dataset.map(encode, batched=True, remove_columns=drop, desc="tokenising")

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], Batch]:
        pad_id = pad_token_id(tokenizer)

        def collate(features: list[dict[str, Any]]) -> Batch:
            batch = _pad_inputs(features, pad_id)
            batch[LABELS] = torch.as_tensor([f[LABELS] for f in features], dtype=torch.long)
            return batch

        return collate

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(**_model_inputs(batch)).logits
        return F.cross_entropy(logits.float(), batch[LABELS])

    def peer_losses(self, model: nn.Module, batch: Batch, peers: int,
                    logit_offset: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`Task.peer_losses`; ``logit_offset (peers, num_labels)`` is added to each peer's
        logits before the cross-entropy (training only: the label-prior adjustment of
        :mod:`d2ora.engine.label_prior`)."""
        logits = model(**_model_inputs(batch)).logits.float()
        if logit_offset is not None:
            logits = (logits.view(peers, -1, logits.shape[-1]) + logit_offset[:, None, :].to(logits)).view_as(logits)
        per_example = F.cross_entropy(logits, batch[LABELS], reduction="none")
        return per_example.view(peers, -1).mean(dim=1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        try:
            for batch in batches:
                batch = _to_device(batch, device)
                logits = model(**_model_inputs(batch)).logits.float()
                loss_sum += float(F.cross_entropy(logits, batch[LABELS], reduction="sum"))
                correct += int((logits.argmax(-1) == batch[LABELS]).sum())
                total += len(batch[LABELS])
        finally:
            model.train(was_training)
        if total == 0:
            return {"accuracy": float("nan"), "loss": float("nan"), "examples": 0}
        return {"accuracy": correct / total, "loss": loss_sum / total, "examples": total}


def causal_lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Targets for a causal LM: the inputs themselves, with padding set to ``IGNORE_INDEX``.

    Padding is found by the attention mask, not the pad id: Llama-style tokenisers pad with their
    eos token, and a real eos inside a text must still be learned.
    """
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token NLL, number of target tokens): position t predicts label t+1."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return nll, int((shift_labels != IGNORE_INDEX).sum())


def perplexity(mean_nll: float) -> float:
    """``exp(mean NLL)``; inf instead of an OverflowError for a hopeless model."""
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


@dataclass
class CausalLMTask(Task):
    """Next-token prediction; each text is one sequence, truncated to ``max_length`` tokens."""

    name: TaskName = "causal_lm"
    peft_task_type: str = "CAUSAL_LM"
    metric: str = "perplexity"
    higher_is_better: bool = False

    def tokenize(self, dataset: Dataset, tokenizer: Any, max_length: int) -> Dataset:
        def encode(batch: dict[str, list]) -> dict[str, list]:
            return tokenizer(batch[TEXT], truncation=True, max_length=max_length, return_token_type_ids=False)

        # Blank texts would tokenise to special tokens only: nothing of the data to learn.
        dataset = dataset.filter(lambda row: bool(row[TEXT].strip()), desc="dropping blank texts")
        if LABELS in dataset.column_names:  # keep class labels for label-skewed partitions, out of the model's way
            dataset = dataset.rename_column(LABELS, CLASS_LABELS)
        drop = [c for c in dataset.column_names if c != CLASS_LABELS]
        tokenised = dataset.map(encode, batched=True, remove_columns=drop, desc="tokenising")
        # A sequence of one token has no next token to predict.
        return tokenised.filter(lambda row: len(row["input_ids"]) >= 2, desc="dropping 1-token texts")

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], Batch]:
        pad_id = pad_token_id(tokenizer)

        def collate(features: list[dict[str, Any]]) -> Batch:
            batch = _pad_inputs(features, pad_id)
            batch[LABELS] = causal_lm_labels(batch["input_ids"], batch["attention_mask"])
            return batch

        return collate

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(**_model_inputs(batch)).logits
        nll, count = token_nll_sum(logits, batch[LABELS])
        return nll / max(count, 1)

    def peer_losses(self, model: nn.Module, batch: Batch, peers: int) -> torch.Tensor:
        # Head + cross-entropy in chunks of tokens: every peer's fp32 logits never exist at once.
        per_peer_sum, per_peer_tokens = peer_token_nll(model, _model_inputs(batch), batch[LABELS], peers)
        return per_peer_sum / per_peer_tokens.clamp_min(1)

    def peer_loss_units(self, batch: Batch, peers: int) -> torch.Tensor:
        """Each peer's target tokens: its loss is a mean over them."""
        return (batch[LABELS][:, 1:] != IGNORE_INDEX).reshape(peers, -1).sum(dim=1).to(torch.float64)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> dict[str, float]:
        was_training = model.training
        model.eval()
        nll_sum = 0.0
        tokens = 0
        try:
            for batch in batches:
                batch = _to_device(batch, device)
                nll, count = token_nll_sum(model(**_model_inputs(batch)).logits, batch[LABELS])
                nll_sum += float(nll)
                tokens += count
        finally:
            model.train(was_training)
        if tokens == 0:
            return {"perplexity": float("nan"), "loss": float("nan"), "tokens": 0}
        mean_nll = nll_sum / tokens
        return {"perplexity": perplexity(mean_nll), "loss": mean_nll, "tokens": tokens}


def make_task(name: TaskName, dataset: Dataset | None = None, *, train_on_prompt: bool = False) -> Task:
    """The task called ``name``; classification reads its label names from ``dataset``;
    ``train_on_prompt`` is sft's (loss on every token, not only the assistant's)."""
    if name == "classification":
        if dataset is None:
            raise ValueError("classification needs a labelled dataset to read its label names from")
        return ClassificationTask.from_dataset(dataset)
    if name == "causal_lm":
        return CausalLMTask()
    if name == "sft":
        # Imported here, not at the top: SFTTask builds on CausalLMTask, defined above.
        from d2ora.data.sft_task import SFTTask

        return SFTTask(train_on_prompt=train_on_prompt)
    raise ValueError(f"unknown task '{name}'; use 'classification', 'causal_lm' or 'sft'")
