"""Data sources, splits and tasks: real BBC News, local files, in-memory data, tokenisation, perplexity."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from d2ora.data import (
    IGNORE_INDEX,
    CausalLMTask,
    ClassificationTask,
    DataSourceError,
    load_bbc_news,
    load_source,
    make_task,
    split_dataset,
    split_indices,
    subsample,
)
from d2ora.models import ModelLoadError, load_model, resolve_model

from .conftest import minilm_path

BBC_CLASSES = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def bbc() -> Dataset:
    return load_bbc_news()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


# ------------------------------------------------------------------------------------------ sources
def test_bbc_news_has_2225_articles_in_5_sorted_classes(bbc: Dataset) -> None:
    assert len(bbc) == 2225
    feature = bbc.features["labels"]
    assert isinstance(feature, ClassLabel)
    assert feature.names == BBC_CLASSES
    counts = Counter(bbc["labels"])
    assert counts == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    assert all(isinstance(t, str) and len(t) > 100 for t in bbc["text"][:50])
    # The one Windows-1252 file (a pound sign) is decoded, not dropped or mangled into U+FFFD.
    assert not any("\ufffd" in t for t in bbc["text"])
    assert any("£" in t for t in bbc["text"])


def test_bbc_news_via_load_source_without_labels(bbc: Dataset) -> None:
    text_only = load_source("bbc_news", label_column=None)
    assert text_only.column_names == ["text"]
    assert text_only["text"][:3] == bbc["text"][:3]


def test_in_memory_source_maps_labels_in_sorted_order() -> None:
    data = {"sentence": ["a", "b", "c", "d"], "topic": ["zeta", "alpha", "zeta", "mid"], "extra": [1, 2, 3, 4]}
    ds = load_source(data, text_column="sentence", label_column="topic")
    assert ds.column_names == ["text", "labels"]
    assert ds.features["labels"].names == ["alpha", "mid", "zeta"]
    assert ds["labels"] == [2, 0, 2, 1]
    assert ds["text"] == ["a", "b", "c", "d"]


def test_integer_labels_sort_numerically() -> None:
    ds = load_source({"text": ["a", "b", "c"], "label": [10, 2, 2]})
    assert ds.features["labels"].names == ["2", "10"]
    assert ds["labels"] == [1, 0, 0]


def test_local_csv_and_jsonl_sources(tmp_path) -> None:
    csv_path = tmp_path / "news.csv"
    csv_path.write_text('body,cat\n"first, with comma",sport\nsecond,arts\nthird,sport\n', encoding="utf-8")
    ds = load_source(str(csv_path), text_column="body", label_column="cat")
    assert ds["text"] == ["first, with comma", "second", "third"]
    assert ds.features["labels"].names == ["arts", "sport"]
    assert ds["labels"] == [1, 0, 1]

    jsonl_path = tmp_path / "news.jsonl"
    rows = [{"text": "one", "label": "b"}, {"text": "two", "label": "a"}]
    jsonl_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    ds = load_source(jsonl_path)
    assert ds["text"] == ["one", "two"]
    assert ds["labels"] == [1, 0]


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_csv_reads_like_the_plain_file(tmp_path, suffix: str) -> None:
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    content = 'body,cat\n"first, with comma",sport\nsecond,arts\n'
    (tmp_path / "plain.csv").write_text(content, encoding="utf-8")
    (tmp_path / f"packed.csv{suffix}").write_bytes(compress(content.encode("utf-8")))
    plain = load_source(tmp_path / "plain.csv", text_column="body", label_column="cat")
    packed = load_source(str(tmp_path / f"packed.csv{suffix}"), text_column="body", label_column="cat")
    assert packed["text"] == plain["text"] == ["first, with comma", "second"]
    assert packed["labels"] == plain["labels"] == [1, 0]


def test_rows_without_text_are_dropped_and_an_empty_source_is_an_error(tmp_path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\ngood film,pos\n,neg\n   ,neg\nbad film,neg\n", encoding="utf-8")
    ds = load_source(path)
    assert list(zip(ds["text"], ds["labels"])) == [("good film", 1), ("bad film", 0)]
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n,pos\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match="no rows with text in column 'text'"):
        load_source(empty)


def test_local_txt_source_is_one_example_per_nonblank_line(tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("line one\n\nline two\n   \nline three\n", encoding="utf-8")
    ds = load_source(path, label_column=None)
    assert ds["text"] == ["line one", "line two", "line three"]


def test_class_folder_source(tmp_path) -> None:
    for cls, texts in {"pos": ["good", "great"], "neg": ["bad"]}.items():
        (tmp_path / cls).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / cls / f"{i}.txt").write_text(text, encoding="utf-8")
    ds = load_source(str(tmp_path))
    assert ds.features["labels"].names == ["neg", "pos"]
    assert list(zip(ds["text"], ds["labels"])) == [("bad", 0), ("good", 1), ("great", 1)]


def test_source_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(DataSourceError, match="data file not found: .*missing.csv"):
        load_source(str(tmp_path / "missing.csv"))
    with pytest.raises(DataSourceError, match="label column 'nope' not found"):
        load_source({"text": ["a"], "label": ["x"]}, label_column="nope")
    with pytest.raises(DataSourceError, match="text column 'body' not found"):
        load_source({"text": ["a"], "label": ["x"]}, text_column="body")
    with pytest.raises(DataSourceError, match="missing values"):
        load_source({"text": ["a", "b"], "label": ["x", None]})
    (tmp_path / "data.csv.rar").write_text("x", encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"unsupported type '\.csv\.rar'"):
        load_source(str(tmp_path / "data.csv.rar"))


# ------------------------------------------------------------------------------------------- splits
def test_splits_are_deterministic_disjoint_complete_and_stratified(bbc: Dataset) -> None:
    a = split_indices(bbc, 0.15, 0.15, seed=7)
    b = split_indices(bbc, 0.15, 0.15, seed=7)
    c = split_indices(bbc, 0.15, 0.15, seed=8)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["train"], c["train"])

    sets = {name: set(idx.tolist()) for name, idx in a.items()}
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert sets["train"] | sets["validation"] | sets["test"] == set(range(len(bbc)))

    labels = np.asarray(bbc["labels"])
    overall = np.bincount(labels) / len(labels)
    for name, idx in a.items():
        share = np.bincount(labels[idx], minlength=5) / len(idx)
        assert np.abs(share - overall).max() < 0.01, name  # stratified: proportions within 1 point
    assert abs(len(a["test"]) - 0.15 * len(bbc)) <= 5
    # Each split is shuffled, so its first rows are not all one class.
    assert len(set(labels[a["train"][:20]].tolist())) > 1


def test_split_dataset_returns_named_splits_keeping_labels(bbc: Dataset) -> None:
    splits = split_dataset(bbc, 0.1, 0.2, seed=0)
    assert set(splits) == {"train", "validation", "test"}
    assert sum(len(s) for s in splits.values()) == len(bbc)
    assert splits["test"].features["labels"].names == BBC_CLASSES


def test_split_fractions_are_checked(bbc: Dataset) -> None:
    with pytest.raises(DataSourceError, match="leave some training data"):
        split_indices(bbc, 0.5, 0.5, seed=0)


def test_subsample_keeps_class_proportions(bbc: Dataset) -> None:
    small = subsample(bbc, 100, seed=1)
    assert len(small) == 100
    counts = Counter(small["labels"])
    expected = {c: n * 100 / len(bbc) for c, n in Counter(bbc["labels"]).items()}
    assert all(abs(counts[c] - expected[c]) < 1 for c in expected)
    assert subsample(bbc, 100, seed=1)["text"] == small["text"]
    assert subsample(bbc, None) is bbc


# -------------------------------------------------------------------------------------------- tasks
def test_classification_tokenisation_and_collate(bbc: Dataset, tokenizer) -> None:
    task = make_task("classification", bbc)
    assert isinstance(task, ClassificationTask) and task.num_labels == 5
    tokenised = task.tokenize(bbc.select(range(0, 2225, 300)), tokenizer, max_length=32)
    assert set(tokenised.column_names) == {"input_ids", "attention_mask", "labels"}
    assert isinstance(tokenised.features["labels"], ClassLabel)  # labels stay readable per example
    assert max(len(ids) for ids in tokenised["input_ids"]) == 32

    short = task.tokenize(Dataset.from_dict({"text": ["hi", "a longer text here"], "labels": [0, 1]}), tokenizer, 32)
    batch = task.collator(tokenizer)([short[0], short[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, len(short[1]["input_ids"]))
    assert batch["labels"].tolist() == [0, 1]
    n0 = len(short[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (batch["input_ids"].shape[1] - n0)
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_token_id).all()


def _tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def test_causal_lm_labels_mask_padding_only(tokenizer) -> None:
    task = CausalLMTask()
    raw = Dataset.from_dict({"text": ["short one", "a much longer sentence with more tokens", ""]})
    tokenised = task.tokenize(raw, tokenizer, max_length=16)
    assert len(tokenised) == 2  # the blank text is dropped, not kept as [CLS] [SEP]
    batch = task.collator(tokenizer)([tokenised[0], tokenised[1]])
    n0 = len(tokenised[0]["input_ids"])
    width = batch["input_ids"].shape[1]
    assert batch["labels"][0, :n0].tolist() == tokenised[0]["input_ids"]
    assert batch["labels"][0, n0:].tolist() == [IGNORE_INDEX] * (width - n0)
    assert batch["labels"][1].tolist() == tokenised[1]["input_ids"]


def test_causal_lm_labels_keep_a_real_eos_equal_to_pad() -> None:
    from d2ora.data.tasks import causal_lm_labels

    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 2, 2]])  # pad id 2 == eos id 2
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = causal_lm_labels(ids, mask)
    assert labels.tolist() == [[5, 2, 7, 2], [5, 6, 2, IGNORE_INDEX]]


def test_perplexity_matches_hand_computation(tokenizer) -> None:
    model = _tiny_llama(len(tokenizer))
    task = CausalLMTask()
    raw = Dataset.from_dict({"text": ["the cat sat", "a dog ran far away from home", "hello world again"]})
    tokenised = task.tokenize(raw, tokenizer, max_length=16)
    collate = task.collator(tokenizer)
    batches = [collate([tokenised[0], tokenised[1]]), collate([tokenised[2]])]
    got = task.evaluate(model, batches)

    # By hand: every example alone (no padding at all), sum NLL of token t+1 given tokens <= t.
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for row in tokenised:
            ids = torch.tensor([row["input_ids"]])
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            nll_sum -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(nll_sum / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll_sum / count), rel=1e-5)
    # Token-weighted over the split, not the mean of per-batch means.
    per_batch = [task.evaluate(model, [b])["loss"] for b in batches]
    assert abs(got["loss"] - sum(per_batch) / 2) > 1e-4


def test_causal_lm_training_loss_equals_hf_loss(tokenizer) -> None:
    model = _tiny_llama(len(tokenizer))
    task = CausalLMTask()
    tokenised = task.tokenize(Dataset.from_dict({"text": ["one two three four", "five six"]}), tokenizer, 16)
    batch = task.collator(tokenizer)([tokenised[0], tokenised[1]])
    ours = task.loss(model, batch)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_classification_accuracy_on_a_known_model(tokenizer) -> None:
    class Fixed(torch.nn.Module):
        """Predicts class 1 whenever the first real token after [CLS] is even."""

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(len(input_ids), 2)
            logits[:, 1] = (input_ids[:, 1] % 2 == 0).float()
            return type("Out", (), {"logits": logits})()

    task = ClassificationTask(label_names=["a", "b"])
    raw = Dataset.from_dict({"text": ["hello", "world", "cat", "dog"], "labels": [0, 1, 0, 1]})
    tokenised = task.tokenize(raw, tokenizer, 8)
    even = [int(ids[1] % 2 == 0) for ids in tokenised["input_ids"]]
    expected = sum(e == y for e, y in zip(even, raw["labels"])) / 4
    got = task.evaluate(Fixed(), [task.collator(tokenizer)(list(tokenised))])
    assert got["accuracy"] == expected and got["examples"] == 4


# ------------------------------------------------------------------------------------------- models
def test_minilm_preset_loads_with_seeded_head() -> None:
    a = load_model("minilm", "classification", label_names=["x", "y", "z"], seed=3)
    b = load_model("minilm", "classification", label_names=["x", "y", "z"], seed=3)
    assert a.new_modules == ["classifier"]
    assert a.model.config.id2label == {0: "x", 1: "y", 2: "z"}
    torch.testing.assert_close(a.model.classifier.weight, b.model.classifier.weight)
    assert a.tokenizer.pad_token_id == 0


def test_model_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="model not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        load_model("no-such-org/no-such-model-d2ora", "classification", label_names=["a"])
    assert "\n" not in str(info.value) and "no-such-model-d2ora" in str(info.value)


def test_smollm2_preset_resolves_to_its_gguf_file() -> None:
    source = resolve_model("smollm2")
    assert source.gguf_file is not None and source.gguf_file.endswith(".gguf")
    assert (resolve_model("smollm2").path + "/" + source.gguf_file).endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_smollm2_preset_loads_from_gguf_and_predicts_english(bbc: Dataset) -> None:
    loaded = load_model("smollm2", "causal_lm")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id  # no pad token of its own
    task = CausalLMTask()
    tokenised = task.tokenize(bbc.select(range(0, 2225, 300)), loaded.tokenizer, max_length=64)
    batch = task.collator(loaded.tokenizer)(list(tokenised))
    ppl = task.evaluate(loaded.model, [batch])["perplexity"]
    assert ppl < 200  # a real language model on news text; a random one is near the 49,152-token vocabulary
