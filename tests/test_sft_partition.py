"""Non-IID partitions of instruction (sft) data, one data source per peer, and the label-flip attack
on sft data (d2ora.recipes.session.prepare_peer_data).

References are independent of the code under test: every example carries a marker word of its
domain / file in its own text, which the checks read back by decoding the tokens each peer trains
on; the partitioner is called directly on the domains read that way; answers are decoded from the
target tokens.
"""

from __future__ import annotations

import json
import types
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from d2ora.data.partition import PartitionError, partition, source_partition
from d2ora.data.sft import ANSWER_LABELS
from d2ora.data.sources import DataSourceError
from d2ora.data.tasks import CLASS_LABELS, IGNORE_INDEX
from d2ora.recipes.session import prepare_peer_data
from d2ora.recipes.simulate_config import SimulateConfig

DOMAINS = ["fruit", "car", "animal", "city"]  # sorted: animal, car, city, fruit
SECTIONS = ["business", "entertainment", "politics", "sports", "tech"]
FILLER = ["name", "a", "one", "more", "please", "then", "and", "be", "brief"]
ANSWERS = ["apple", "banana", "cherry"]
MARKERS = ["alpha", "bravo", "charlie"]  # one per peer source
EOS = "[EOS]"


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: every word used here is its own token, so decoding gives the words back."""
    specials = ["[PAD]", "[UNK]", EOS]
    words = [*DOMAINS, *SECTIONS, *FILLER, *ANSWERS, *MARKERS, *"abc", "<|user|>", "<|assistant|>", "positive", "negative"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials, *words]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token=EOS)


TOK = word_tokenizer()


def stub_model(task: Any) -> Any:
    return types.SimpleNamespace(tokenizer=TOK)  # prepare_peer_data needs only the tokenizer


def config(**sections: dict[str, Any]) -> SimulateConfig:
    base: dict[str, dict[str, Any]] = {"model": {"task": "sft"}, "data": {"max_test_samples": None, "max_length": 64}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return SimulateConfig.model_validate(base)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def words(ids: list[int]) -> list[str]:
    return TOK.convert_ids_to_tokens(ids)


def answer_of(row: dict[str, Any]) -> list[str]:
    return [w for w in words([t for t in row[ANSWER_LABELS] if t != IGNORE_INDEX]) if w != EOS]


def domain_rows(fmt: str, n: int = 96) -> list[dict[str, Any]]:
    """Unbalanced domains; the domain's word is in the prompt, the answer is not the domain."""
    rows = []
    for i in range(n):
        domain = DOMAINS[min(i % 7, 3)]  # fruit 1/7, car 1/7, animal 1/7, city 4/7
        prompt, answer = f"name a {domain} {FILLER[i % len(FILLER)]}", ANSWERS[i % 3]
        if fmt == "messages":
            row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        elif fmt == "alpaca":
            row = {"instruction": prompt, "input": "", "output": answer}
        else:
            row = {"prompt": prompt, "completion": answer}
        rows.append({**row, "domain": domain})
    return rows


# -------------------------------------------------------------------------------- by a domain column
@pytest.mark.parametrize(("fmt", "scheme"), [("messages", "k_labels"), ("alpaca", "dirichlet"), ("prompt_completion", "k_labels"),
                                             ("prompt_completion", "dirichlet")])
def test_a_domain_column_deals_sft_rows_as_the_partitioner_does(tmp_path: Path, fmt: str, scheme: str) -> None:
    source = write_jsonl(tmp_path / "d.jsonl", domain_rows(fmt))
    cfg = config(data={"source": source, "label_column": "domain", "partition": scheme, "labels_per_peer": 1,
                       "dirichlet_alpha": 0.3, "min_partition_size": 4, "local_val_fraction": 0.0}, network={"peers": 4})
    data, _ = prepare_peer_data(cfg, stub_model)
    # The domain of every pooled row, read from its own tokens; ids in sorted-name order.
    seen = [next(w for w in words(row["input_ids"]) if w in DOMAINS) for row in data.train_rows]
    names = sorted(DOMAINS)
    expected = partition(np.array([names.index(d) for d in seen]), 4, scheme, cfg.run.seed, **cfg.data.partition_params())
    assert data.class_names == names
    assert [s.tolist() for s in data.train_shards] == [s.tolist() for s in expected]
    for shard in data.train_shards:  # the answers are trained on, not the domain
        assert all(answer_of(data.train_rows[i])[0] in ANSWERS for i in shard)
    counts = [Counter(seen[i] for i in shard) for shard in data.train_shards]
    if scheme == "k_labels":  # one domain per peer, each domain to exactly one peer
        assert sorted(d for c in counts for d in c) == names and all(len(c) == 1 for c in counts)
    else:
        assert sum(counts, Counter()) == Counter(seen) and len({frozenset(c) for c in counts}) > 1


def test_the_class_of_an_offline_instruction_task_is_its_domain() -> None:
    cfg = config(data={"source": "bbc_news_sections", "partition": "k_labels", "labels_per_peer": 1, "max_train_samples": 60,
                       "max_test_samples": 10, "max_length": 128, "local_val_fraction": 0.0}, network={"peers": 5})
    data, _ = prepare_peer_data(cfg, stub_model)
    sections = [answer_of(data.train_rows[i]) for shard in data.train_shards for i in shard]
    assert all(len(a) == 1 and a[0] in SECTIONS for a in sections)
    per_peer = [{answer_of(data.train_rows[i])[0] for i in shard} for shard in data.train_shards]
    assert sorted(s for p in per_peer for s in p) == SECTIONS  # each peer one section, each section one peer


def test_a_missing_domain_column_is_one_error(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "d.jsonl", domain_rows("prompt_completion"))
    cfg = config(data={"source": source, "label_column": "topic", "partition": "k_labels"}, network={"peers": 4})
    with pytest.raises(DataSourceError, match="label column 'topic' not found"):
        prepare_peer_data(cfg, stub_model)


# ------------------------------------------------------------------------------------ one file per peer
def source_rows(k: int, task: str) -> list[dict[str, Any]]:
    """File k: 20 + 6k rows, each with the marker word of its file and a unique number-word."""
    rows = []
    for i in range(20 + 6 * k):
        text = f"{MARKERS[k]} {FILLER[i % len(FILLER)]} {FILLER[(i // len(FILLER)) % len(FILLER)]} {'abc'[i % 3]}"
        if task == "sft":
            rows.append({"prompt": text, "completion": ANSWERS[(i + k) % 3]})
        else:  # classification: file k holds classes k and k+1 only, so label ids must be aligned
            rows.append({"text": text, "label": ["a", "b", "c", "d"][k + i % 2]})
    return rows


@pytest.mark.parametrize("task", ["classification", "causal_lm", "sft"])
def test_peer_k_trains_on_file_k_only(tmp_path: Path, task: str) -> None:
    files = [write_jsonl(tmp_path / f"p{k}.jsonl", source_rows(k, task)) for k in range(3)]
    cfg = config(model={"task": task}, data={"partition": "by_source", "peer_sources": files, "test_fraction": 0.2,
                                             "local_val_fraction": 0.1}, network={"peers": 3})
    data, _ = prepare_peer_data(cfg, stub_model)
    file_texts = [Counter(" ".join(r.get("prompt", r.get("text")).split()) for r in source_rows(k, task)) for k in range(3)]
    texts = [" ".join(w for w in words(row["input_ids"]) if w in {*MARKERS, *FILLER, *"abc"}) for row in data.train_rows]
    test_texts = [" ".join(w for w in words(row["input_ids"]) if w in {*MARKERS, *FILLER, *"abc"}) for row in data.test.to_list()]
    for k in range(3):
        own = Counter(texts[i] for i in np.concatenate([data.train_shards[k], data.val_shards[k]]))
        held_out = Counter(t for t in test_texts if t.split()[0] == MARKERS[k])
        assert own + held_out == file_texts[k]  # the file, split between peer k and the test set
        # test_fraction of the file, per class when it has classes (a stratified split rounds per class)
        strata = Counter(r["label"] if task == "classification" else "" for r in source_rows(k, task)).values()
        assert sum(held_out.values()) == sum(round(n * 0.2) for n in strata)
        assert len(data.val_shards[k]) == round(sum(own.values()) * 0.1)
    if task == "classification":  # ids over the union of the files' classes, each row keeping its own class
        assert data.class_names == ["a", "b", "c", "d"]
        truth = {" ".join(r["text"].split()): r["label"] for k in range(3) for r in source_rows(k, task)}
        assert all(data.class_names[row["labels"]] == truth[t] for row, t in zip(data.train_rows, texts))
    assert "test: 0.2 of each source, pooled" in cfg.data.partition_label()


def test_source_partition_is_exact_and_refuses_an_empty_peer() -> None:
    sources = np.array([2, 0, 0, 1, 2, 2])
    assert [p.tolist() for p in source_partition(sources, 3)] == [[1, 2], [3], [0, 4, 5]]
    with pytest.raises(PartitionError, match="peer 1's source has no training examples"):
        source_partition(np.array([0, 2]), 3)


@pytest.mark.parametrize(("data", "peers", "message"), [
    ({"partition": "by_source", "peer_sources": ["a.jsonl", "b.jsonl"]}, 3, "lists 2 source.s. but network.peers is 3"),
    ({"partition": "by_source"}, 2, "needs data.peer_sources"),
    ({"peer_sources": ["a.jsonl", "b.jsonl"]}, 2, "set data.partition: by_source"),
])
def test_peer_sources_config_errors_are_one_line(data: dict[str, Any], peers: int, message: str) -> None:
    from d2ora.config_io import ConfigError, load_config

    sets = [f"data.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in data.items()] + [f"network.peers={peers}"]
    with pytest.raises(ConfigError, match=message) as info:
        load_config(SimulateConfig, None, sets)
    assert "\n" not in str(info.value).strip()


# -------------------------------------------------------------------------------- label flip on sft
def test_label_flip_on_sft_trains_the_byzantine_peer_on_the_other_class_word() -> None:
    sets = {"data": {"source": "bbc_news_sections", "partition": "iid", "max_train_samples": 40, "max_test_samples": 5,
                     "max_length": 128}, "network": {"peers": 3}}
    clean, _ = prepare_peer_data(config(**sets), stub_model)
    poisoned, _ = prepare_peer_data(config(**sets, trust={"attack": "label_flip", "byzantine": [1]}), stub_model)
    def rows(data: Any, k: int) -> list[dict[str, Any]]:  # the model's inputs and targets
        return [{c: data.train_rows[i][c] for c in ("input_ids", "attention_mask", ANSWER_LABELS)} for i in data.train_shards[k]]

    for k in (0, 2):  # honest peers: the same rows as without the attack (which reads no labels)
        assert rows(clean, k) == rows(poisoned, k)
    originals = [clean.train_rows[i] for i in clean.train_shards[1]]
    copies = [poisoned.train_rows[i] for i in poisoned.train_shards[1]]
    assert len(copies) == len(originals) > 0
    for before, after in zip(originals, copies):
        [word] = answer_of(before)
        y = SECTIONS.index(word)
        assert answer_of(after) == [SECTIONS[4 - y]]  # y -> C-1-y, as a word
        assert after[CLASS_LABELS] == 4 - y
        prompt = [t for t, a in zip(before["input_ids"], before[ANSWER_LABELS]) if a == IGNORE_INDEX]
        assert [t for t, a in zip(after["input_ids"], after[ANSWER_LABELS]) if a == IGNORE_INDEX] == prompt
    flipped = np.bincount([4 - SECTIONS.index(answer_of(r)[0]) for r in originals], minlength=5)
    assert np.bincount(poisoned.labels[poisoned.train_shards[1]], minlength=5).tolist() == flipped.tolist()


def test_label_flip_needs_answers_that_are_class_words(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "d.jsonl", domain_rows("prompt_completion"))
    cfg = config(data={"source": source, "label_column": "domain", "partition": "iid"}, network={"peers": 2},
                 trust={"attack": "label_flip", "byzantine": [1]})
    with pytest.raises(PartitionError, match="answers must be the class names; training example"):
        prepare_peer_data(cfg, stub_model)
    causal = config(model={"task": "causal_lm"}, data={"source": {"text": ["a b c"] * 20, "label": ["a", "b"] * 10},
                                                       "partition": "iid"},
                    network={"peers": 2}, trust={"attack": "label_flip", "byzantine": [1]})
    with pytest.raises(PartitionError, match="attack label_flip needs class labels to flip"):
        prepare_peer_data(causal, stub_model)


def test_a_one_round_sft_simulation_with_one_file_per_peer_and_a_label_flipper(tmp_path: Path) -> None:
    """The whole simulator: by_source over sft files whose answers are class words, peer 1 flipping."""
    from d2ora.recipes.simulate import simulate

    model_dir = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=len(TOK), max_position_embeddings=64,
                                 pad_token_id=TOK.pad_token_id)).save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    files = []
    for k in range(3):
        rows = [{"prompt": r["prompt"], "completion": r["completion"], "label": r["completion"]} for r in source_rows(k, "sft")]
        files.append(write_jsonl(tmp_path / f"p{k}.jsonl", rows))
    cfg = config(model={"name": str(model_dir)}, data={"partition": "by_source", "peer_sources": files},
                 network={"peers": 3, "topology": "complete"}, trust={"attack": "label_flip", "byzantine": [1]},
                 adapter={"r": 2}, optim={"batch_size": 2},
                 run={"rounds": 1, "local_steps": 1, "output_dir": str(tmp_path / "out"), "save_merged": False,
                      "save_adapters": False, "tensorboard": False, "generate_examples": 0, "eval_peers": False})
    summary = simulate(cfg)
    clean, _ = prepare_peer_data(cfg.updated({"trust.attack": "none", "trust.byzantine": []}), stub_model)
    # each peer's answers, read from its training tokens (the clean run reads no labels)
    expected = [np.bincount([ANSWERS.index(answer_of(clean.train_rows[i])[0]) for i in s], minlength=3).tolist()
                for s in clean.train_shards]
    assert summary["partition"].startswith("by_source(3 sources")
    assert summary["label_counts"][0] == expected[0] and summary["label_counts"][2] == expected[2]
    assert summary["label_counts"][1] == expected[1][::-1]
