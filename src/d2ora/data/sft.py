"""Supervised fine-tuning (SFT) data: instruction rows in several formats -> chat turns -> tokens.

**Formats** (``data.format``), each read into one internal form, a ``messages`` column holding a
list of chat turns ``{"role": "system" | "user" | "assistant", "content": str}`` per example:

- ``messages``: Hugging Face chat format, ``{"messages": [{"role": ..., "content": ...}, ...]}``;
- ``alpaca``: ``{instruction, input, output}`` -> user ``instruction`` (+ ``"\\n\\n" + input`` when
  ``input`` is not blank), assistant ``output``;
- ``prompt_completion``: ``{prompt, completion}`` -> user ``prompt``, assistant ``completion``;
- ``auto`` (default) picks by columns, in that order: ``messages``; ``instruction`` + ``output``;
  ``prompt`` + ``completion``.

``text`` (plain text) is the ``causal_lm`` task's format, not SFT's. A malformed row is one
:class:`DataSourceError` naming the source, the row (1-based, the line of a JSONL file) and the field.

**Rendering.** A conversation is rendered with the tokenizer's own chat template
(``tokenizer.apply_chat_template``). A tokenizer without one gets :data:`FALLBACK_CHAT_TEMPLATE`
(Zephyr's layout) and a warning line saying so; for ``user: "hi"``, ``assistant: "yo"`` it renders::

    <|user|>\\nhi{eos}\\n<|assistant|>\\nyo{eos}\\n

(``{eos}`` is the tokenizer's eos token text, empty when it has none; a system turn is
``<|system|>\\n...{eos}\\n``; the generation prompt is ``<|assistant|>\\n``).

**Targets.** The rendered text is tokenised once (``add_special_tokens=False``: the template
writes its own special tokens), so the model trains on exactly the tokens it sees at generation
time. An assistant turn's characters are those between the rendering of the turns before it with
the generation prompt and the rendering that includes it: its content and the template's
end-of-turn text (so the model learns to stop). A token is a target when its first character lies
in an assistant turn; ``answer_labels`` holds the token id there and ``-100`` (ignored) elsewhere.
Sequences are cut to ``max_length`` tokens; an example left with no answer token is dropped and
counted (it would train on nothing, or only on its prompt).

**No packing.** Several short examples in one row would need per-example position ids and a
block-diagonal attention mask so that no example attends across another; the peer-batched path
(one forward over every peer's rows through ``StackedDoRALinear``) takes a plain padding mask
only, so each example is its own row and short batches are padded dynamically instead.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from datasets import ClassLabel, Dataset

from d2ora.data.instructions import INSTRUCTION_LOADERS
from d2ora.data.sources import (
    LABELS,
    DataSourceError,
    encode_labels,
    load_table,
)
from d2ora.data.tasks import IGNORE_INDEX

DataFormat = Literal["auto", "messages", "alpaca", "prompt_completion", "text"]
SFT_FORMATS = ("messages", "alpaca", "prompt_completion")
MESSAGES = "messages"
ANSWER_LABELS = "answer_labels"
#: A pool row's index, kept through tokenising (which drops examples) when the run needs to find an
#: example's conversation again (the label-flip attack rewrites its answer).
ROW_ID = "row_id"
ROLES = ("system", "user", "assistant")

#: The template a tokenizer without its own gets (Zephyr's layout; see the module docstring).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + (eos_token or '') + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

log = logging.getLogger(__name__)
# Tokenizers already told about the fallback template: one note per run, not one per split.
_noted: weakref.WeakSet[Any] = weakref.WeakSet()


# ------------------------------------------------------------------------------------- reading rows
def detect_format(columns: Sequence[str], origin: str) -> str:
    """The SFT format of a table with ``columns`` (``messages``, ``alpaca`` or ``prompt_completion``)."""
    if MESSAGES in columns:
        return "messages"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    raise DataSourceError(
        f"{origin}: cannot tell the SFT format from columns {list(columns)}; need 'messages', "
        "'instruction' + 'output' (alpaca) or 'prompt' + 'completion' (set data.format to say which)"
    )


def _text(row: Mapping[str, Any], field: str, where: str, *, optional: bool = False) -> str:
    value = row.get(field)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or (not optional and not value.strip()):
        problem = "missing" if value is None else ("blank" if isinstance(value, str) else f"a {type(value).__name__}, not text")
        raise DataSourceError(f"{where}, field '{field}': {problem}")
    return value


def _checked_messages(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataSourceError(f"{where}, field '{MESSAGES}': {'empty' if turns == [] else 'not a list of turns'}")
    out: list[dict[str, str]] = []
    for j, turn in enumerate(turns):
        field = f"{MESSAGES}[{j}]"
        if not isinstance(turn, Mapping):
            raise DataSourceError(f"{where}, field '{field}': not a {{role, content}} mapping")
        role = turn.get("role")
        if role not in ROLES:
            raise DataSourceError(f"{where}, field '{field}.role': {role!r} is not one of {', '.join(ROLES)}")
        content = turn.get("content")
        if not isinstance(content, str):
            raise DataSourceError(f"{where}, field '{field}.content': {'missing' if content is None else 'not text'}")
        out.append({"role": role, "content": content})
    roles = [t["role"] for t in out]
    if "assistant" not in roles:
        raise DataSourceError(f"{where}, field '{MESSAGES}': no assistant turn to learn from")
    if "user" not in roles[: roles.index("assistant")]:
        # A template renders an opening answer differently alone and in context: no prompt to mask.
        raise DataSourceError(f"{where}, field '{MESSAGES}': the first assistant turn has no user turn before it")
    return out


def to_messages(row: Mapping[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """One row of format ``fmt`` as chat turns; ``where`` (source and row) prefixes every error."""
    if fmt == "messages":
        return _checked_messages(row.get(MESSAGES), where)
    if fmt == "alpaca":
        instruction = _text(row, "instruction", where)
        extra = _text(row, "input", where, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", where)}]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": _text(row, "prompt", where)},
                {"role": "assistant", "content": _text(row, "completion", where)}]
    raise DataSourceError(f"data format '{fmt}' is not an SFT format; use one of auto, {', '.join(SFT_FORMATS)}")


def _origin(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return f"data source '{source}'"
    return "in-memory data"


def load_sft_source(source: str | Path | Mapping[str, Sequence[Any]] | Dataset, fmt: DataFormat = "auto", *,
                    label_column: str | None = "label", split: str = "train") -> Dataset:
    """Any source of instruction rows as a ``messages`` (+ ``labels``) dataset.

    ``label_column=None`` reads no labels; otherwise that column becomes the ``labels`` ClassLabel
    (for label-skewed partitions). Built-in instruction sources (``bbc_news_sections``, ``rotten_tomatoes_sentiment``) carry their
    own ``labels`` column (see :mod:`d2ora.data.instructions`), so ``label_column`` is not consulted for them beyond whether labels are wanted.
    """
    if fmt not in get_args(DataFormat):
        raise DataSourceError(f"data format '{fmt}' is unknown; use one of {', '.join(get_args(DataFormat))}")
    if fmt == "text":
        raise DataSourceError("data.format text is plain next-token training: use model.task=causal_lm "
                              f"(sft reads {', '.join(SFT_FORMATS)})")
    origin = _origin(source)
    if isinstance(source, (str, Path)) and str(source) in INSTRUCTION_LOADERS:
        table = INSTRUCTION_LOADERS[str(source)]()
    else:
        table = load_table(source, split=split)
    fmt = detect_format(table.column_names, origin) if fmt == "auto" else fmt
    turns = [to_messages(row, fmt, f"{origin}: row {i + 1}") for i, row in enumerate(table)]
    if not turns:
        raise DataSourceError(f"{origin}: no rows")
    dataset = Dataset.from_dict({MESSAGES: turns})
    if label_column is None:
        return dataset
    if isinstance(table.features.get(LABELS), ClassLabel):  # already encoded (built-in sources)
        return dataset.add_column(LABELS, table[LABELS]).cast_column(LABELS, table.features[LABELS])
    if label_column not in table.column_names:
        raise DataSourceError(f"{origin}: label column '{label_column}' not found; columns are {table.column_names}")
    return encode_labels(dataset.add_column(label_column, table[label_column]), label_column)


def final_answer(messages: Sequence[Mapping[str, str]]) -> str:
    """The content of the conversation's last assistant turn (the answer a class word would be)."""
    return next(t["content"] for t in reversed(messages) if t["role"] == "assistant")


def with_answer(messages: Sequence[Mapping[str, str]], answer: str) -> list[dict[str, str]]:
    """A copy of the conversation whose last assistant turn says ``answer`` instead."""
    out = [dict(t) for t in messages]
    last = max(i for i, t in enumerate(out) if t["role"] == "assistant")
    out[last]["content"] = answer
    return out


def answers_are_labels(messages: Sequence[Sequence[Mapping[str, str]]], labels: Sequence[int], names: Sequence[str]) -> int | None:
    """None when every conversation's final answer is its class's name (surrounding space ignored),
    else the index of the first one that is not."""
    for i, (turns, label) in enumerate(zip(messages, labels)):
        if final_answer(turns).strip() != names[int(label)]:
            return i
    return None


# ---------------------------------------------------------------------------------------- rendering
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text: the tokenizer's chat template, else :data:`FALLBACK_CHAT_TEMPLATE`."""
    template = None if has_chat_template(tokenizer) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def answer_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    full = render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            # Some templates rewrite earlier turns (drop reasoning, move a system prompt): the
            # answer's characters cannot then be found by rendering prefixes.
            raise DataSourceError(
                f"the chat template of {type(tokenizer).__name__} does not render a conversation's first turns as "
                "a prefix of the whole, so its answer tokens cannot be located; use a model with a prefix-stable template"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]] | None:
    """``input_ids``, ``attention_mask`` and ``answer_labels`` of one conversation, cut to
    ``max_length``; None when the cut leaves no answer token to predict."""
    text, spans = answer_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])[:max_length]
    starts = [start for start, _ in encoded["offset_mapping"]][:max_length]
    labels = [tok if any(a <= s < b for a, b in spans) else IGNORE_INDEX for tok, s in zip(ids, starts)]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never predicted
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), ANSWER_LABELS: labels}


def tokenize_sft(dataset: Dataset, tokenizer: Any, max_length: int, keep: Sequence[str] = ()) -> tuple[Dataset, int]:
    """Tokenised examples (``input_ids``, ``attention_mask``, ``answer_labels`` and the ``keep``
    columns) and how many were dropped because ``max_length`` cut off their whole answer."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataSourceError(f"sft needs a fast tokenizer (character offsets locate the answers); "
                              f"{type(tokenizer).__name__} is not one")
    if not has_chat_template(tokenizer) and tokenizer not in _noted:
        _noted.add(tokenizer)
        log.warning("the tokenizer has no chat template: conversations are rendered with d2ora's fallback "
                    "(Zephyr layout, <|user|> / <|assistant|> headers; see d2ora.data.sft)")
    rows: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], ANSWER_LABELS: [], **{c: [] for c in keep}}
    dropped = 0
    for example in dataset:
        encoded = encode(tokenizer, example[MESSAGES], max_length)
        if encoded is None:
            dropped += 1
            continue
        for key, value in encoded.items():
            rows[key].append(value)
        for column in keep:
            rows[column].append(example[column])
    out = Dataset.from_dict(rows)
    for column in keep:  # keep ClassLabel names, so label tables and partitions read them
        out = out.cast_column(column, dataset.features[column])
    return out, dropped
