"""Generative evaluation of the ``sft`` task: greedy answers to test prompts, normalised and compared.

**Prompts and references** come from the evaluation batches themselves, not from the raw rows: a
batch row is the chat-rendered example, and ``answer_labels`` marks the assistant's tokens
(:mod:`d2ora.data.sft`). The prompt is every real token before the first answer token, which is
exactly the rendering with ``add_generation_prompt=True`` (the answer's characters start where that
rendering ends, by construction of the targets), so the model is asked precisely what it was trained
to answer; the reference is the first contiguous run of answer tokens, decoded without special tokens.

**Decoding** is greedy (``do_sample=False``), left-padded with an attention mask (a decoder-only
model continues from the last position of each row, so padding must sit on the left), at most
``max_new_tokens`` new tokens: the longest reference answer's token count plus a margin, so a
correct answer always fits and a rambling one stops soon. It runs on whatever ``model`` is: the
peer-batched model serving one peer (``PeerModel.serving``), which is how the engine evaluates
peers and, through ``holding``, the consensus — no second copy of the base.

**Normalisation** (:func:`normalise_answer`): first non-empty line, lower case, punctuation removed,
whitespace collapsed; with ``first_word`` only the first word (one-word label answers such as
"Business." vs "business" compare equal).
"""

from __future__ import annotations

import contextlib
import string
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from d2ora.data.tasks import IGNORE_INDEX, Batch, pad_token_id

GENERATIVE_ACCURACY = "generative_accuracy"
#: New tokens allowed beyond the longest reference answer (an end-of-turn marker, a stray space).
MARGIN_TOKENS = 4
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str, *, first_word: bool = False) -> str:
    """``text`` reduced for comparison: first non-empty line, lower-cased, without punctuation
    (ASCII and Unicode), whitespace collapsed; with ``first_word`` only its first word."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = line.lower().translate(_PUNCTUATION)
    # Unicode punctuation (curly quotes, dashes, ellipses) too: category P*.
    line = "".join(" " if unicodedata.category(c).startswith("P") else c for c in line)
    words = line.split()
    if first_word:
        return words[0] if words else ""
    return " ".join(words)


@dataclass
class PromptAnswer:
    prompt: list[int]  # token ids up to the assistant turn's start
    answer: list[int]  # the reference answer's token ids (the first assistant turn)


def prompts_and_answers(batches: Iterable[Batch], limit: int | None = None, answer_key: str = "answer_labels") -> list[PromptAnswer]:
    """The first ``limit`` examples of ``batches`` as (prompt, reference answer) token ids.

    The answer tokens are ``answer_key`` (the sft collator's, with ``train_on_prompt``) or else
    ``labels`` (which then hold the answer tokens only). Works for right- or left-padded rows:
    only real tokens (``attention_mask``) count."""
    out: list[PromptAnswer] = []
    for batch in batches:
        key = answer_key if answer_key in batch else "labels"
        ids, mask, answers = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool(), batch[key].cpu()
        for row in range(ids.shape[0]):
            if limit is not None and len(out) >= limit:
                return out
            real = mask[row]
            tokens, targets = ids[row][real], answers[row][real]
            where = torch.nonzero(targets != IGNORE_INDEX, as_tuple=False).flatten()
            if where.numel() == 0:
                continue  # no answer to compare with
            start = int(where[0])
            end = start
            while end < targets.numel() and int(targets[end]) != IGNORE_INDEX:
                end += 1
            out.append(PromptAnswer(prompt=tokens[:start].tolist(), answer=tokens[start:end].tolist()))
    return out


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int,
                    eos_id: int | None, batch_size: int = 16, device: torch.device | str = "cpu") -> list[list[int]]:
    """Greedy continuations (new token ids only, cut after the first eos) of ``prompts``."""
    from d2ora.models import base_autocast  # here: d2ora.models imports the tasks, which import this module

    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, p in enumerate(chunk):  # left padding: every row's last real token is at the end
                ids[j, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
                mask[j, width - len(p):] = 1
            with base_autocast(model, device):  # a half-precision base meets the fp32 adapters
                generated = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id,
                    # The model's generation_config may carry sampling settings; greedy ignores them, so
                    # clear them to keep transformers from warning on every call.
                    temperature=None, top_p=None, top_k=None,
                )
            for row in generated[:, width:].tolist():
                if eos_id is not None and eos_id in row:
                    row = row[: row.index(eos_id)]
                out.append(row)
    finally:
        model.train(was_training)
    return out


@dataclass
class GeneratedAnswers:
    prompts: list[str]
    references: list[str]
    answers: list[str]

    @property
    def correct(self) -> list[bool]:
        first_word = all(len(normalise_answer(r).split()) <= 1 for r in self.references)
        return [normalise_answer(a, first_word=first_word) == normalise_answer(r, first_word=first_word)
                for a, r in zip(self.answers, self.references, strict=True)]

    @property
    def accuracy(self) -> float:
        flags = self.correct
        return sum(flags) / len(flags) if flags else float("nan")


def generate_answers(model: nn.Module, tokenizer: Any, items: Sequence[PromptAnswer], *, batch_size: int = 16,
                     device: torch.device | str = "cpu") -> GeneratedAnswers:
    """Greedy answers of ``model`` to ``items``' prompts, decoded next to their references.

    When every reference is one word (label answers), each answer is compared by its first word,
    so "Business. It covers..." counts as "business"; otherwise by its whole first line."""
    if not items:
        return GeneratedAnswers([], [], [])
    max_new = max(len(it.answer) for it in items) + MARGIN_TOKENS
    new = greedy_generate(model, [it.prompt for it in items], max_new, pad_id=pad_token_id(tokenizer),
                          eos_id=tokenizer.eos_token_id, batch_size=batch_size, device=device)

    def text(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return GeneratedAnswers(prompts=[text(it.prompt) for it in items], references=[text(it.answer).strip() for it in items],
                            answers=[text(ids).strip() for ids in new])


@contextlib.contextmanager
def base_model(peer_model: Any) -> Iterator[nn.Module | None]:
    """The frozen base alone: every stacked DoRA layer swapped for its base layer, so no adapter
    term is computed at all (exact, unlike B=0, which still rescales by m/||W0|| once m has trained).
    Yields None when the adapter trains dense heads (``modules_to_save``): their pretrained weights
    are not kept, so the base model cannot be rebuilt."""
    from d2ora.dora.attach import set_submodule  # here: d2ora.data stays importable without the engine

    if peer_model.heads:
        yield None
        return
    model = peer_model.model
    for name, layer in peer_model.layers.items():
        set_submodule(model, name, layer.base_layer)
    try:
        yield model
    finally:
        for name, layer in peer_model.layers.items():
            set_submodule(model, name, layer)


_ROLE_LINES = {"assistant", "<|assistant|>", "user", "<|user|>", "system", "<|system|>"}


def prompt_question(prompt: str) -> str:
    """The prompt's last line that is not a bare role marker (the template's own lines, left after
    special tokens are dropped): for a report, the question the answer answers."""
    lines = [ln.strip() for ln in prompt.strip().splitlines()]
    return next((ln for ln in reversed(lines) if ln and ln.lower() not in _ROLE_LINES), "")


def sample_answers(peer_model: Any, tokenizer: Any, batches: Iterable[Batch], *, row: int,
                   consensus: torch.Tensor | None, n: int = 3, device: torch.device | str = "cpu") -> list[dict[str, str | None]]:
    """The first ``n`` test examples with the greedy answers of the base model, the consensus model
    (``consensus``, a flat adapter lent to stack row ``row``: peer 0's) and peer 0 (row ``row``);
    a model that cannot be run answers None. Plain dicts: report.model.AnswerSample validates them."""
    items = prompts_and_answers(batches, n)
    if not items:
        return []
    with peer_model.serving(slice(row, row + 1)) as model:
        peer0 = generate_answers(model, tokenizer, items, device=device)
        mixed = None
        if consensus is not None:
            with peer_model.holding(row, consensus):
                mixed = generate_answers(model, tokenizer, items, device=device)
    with base_model(peer_model) as plain:
        base = None if plain is None else generate_answers(plain, tokenizer, items, device=device)
    return [
        {"prompt": prompt_question(peer0.prompts[i]), "reference": peer0.references[i],
         "base": None if base is None else base.answers[i], "consensus": None if mixed is None else mixed.answers[i],
         "peer0": peer0.answers[i]}
        for i in range(len(items))
    ]
