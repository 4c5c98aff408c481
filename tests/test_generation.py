"""Generative evaluation of the sft task (d2ora.data.generation): normalisation, prompts cut from
the batches, greedy decoding through the peer-batched model against Hugging Face's generate on a
merged plain copy, accuracy counts on a model whose answers the test chooses, and a 1-round run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from d2ora import DoRAConfig, attach, merge
from d2ora.data.generation import (
    GENERATIVE_ACCURACY,
    PromptAnswer,
    base_model,
    generate_answers,
    greedy_generate,
    normalise_answer,
    prompt_question,
    prompts_and_answers,
)
from d2ora.data.sft import MESSAGES
from d2ora.data.sft_task import ANSWER_PERPLEXITY, SFTTask
from d2ora.engine.peers import PeerModel
from tests.test_sft import CHATML, chat, tiny_llama_dir, word_tokenizer  # noqa: F401 (tiny_llama_dir: a fixture)


# ---------------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize(("text", "first_word", "expected"), [
    ("  Business.  ", False, "business"),
    ("Business. It is about money.", True, "business"),
    ("Business. It is about money.", False, "business it is about money"),
    ("\n\nSports!\nmore text", False, "sports"),
    ("“Tech” — really…", False, "tech really"),
    ("Hello,   WORLD", False, "hello world"),
    ("", True, ""),
    ("...", False, ""),
])
def test_normalise_answer_hand_cases(text: str, first_word: bool, expected: str) -> None:
    assert normalise_answer(text, first_word=first_word) == expected


def test_prompt_question_drops_role_lines() -> None:
    assert prompt_question("user\nname a fruit\nassistant\n") == "name a fruit"
    assert prompt_question("<|user|>\nname a fruit\n<|assistant|>\n") == "name a fruit"


# ------------------------------------------------------------------------- prompts from the batches
def test_prompts_are_the_generation_prompt_rendering_and_answers_the_assistant_tokens() -> None:
    tok = word_tokenizer(CHATML)
    task = SFTTask()
    conversations = [chat("name a fruit", "apple"), chat("name a car part and then more", "wheel and engine")]
    rows = task.tokenize(Dataset.from_dict({MESSAGES: conversations}), tok, 64).to_list()
    batch = task.collator(tok)(rows)  # right-padded, as the engine's evaluation batches are
    items = prompts_and_answers([batch])
    for item, conv in zip(items, conversations, strict=True):
        expected_prompt = tok.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=False)
        assert item.prompt == tok(expected_prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(item.answer, skip_special_tokens=True).strip() == conv[1]["content"]
    assert task.tokenizer is tok  # the collator hands the tokenizer to evaluation
    assert len(prompts_and_answers([batch], limit=1)) == 1


# ------------------------------------------------------------ peer-batched generation == HF generate
def _tiny_lm(vocab: int, pad: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=vocab, max_position_embeddings=128, pad_token_id=pad)
    return LlamaForCausalLM(config).eval()


def _peers(model: LlamaForCausalLM, peers: int) -> PeerModel:
    attach(model, DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=[], init_seed=0))
    stacked = PeerModel(model, peers)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every peer its own adapter, far from the base, so a mix-up shows in the tokens
        for layer in stacked.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 2.0)
            layer.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))
    return stacked


def _hf_greedy(model: LlamaForCausalLM, prompts: list[list[int]], max_new: int, pad: int) -> list[list[int]]:
    """Reference: Hugging Face generate, one unpadded prompt at a time (no padding to get wrong)."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad, eos_token_id=None)
        out.append(gen[0, len(p):].tolist())
    return out


def test_greedy_generation_through_one_stacked_peer_equals_hf_generate_on_the_merged_peer() -> None:
    vocab, pad = 40, 0
    model = _tiny_lm(vocab, pad)
    plain = copy.deepcopy(model)
    stacked = _peers(model, 3)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (3, 7, 5, 1)]  # ragged: left padding matters
    for k in (0, 2):
        with stacked.peer_view(k) as view:
            merged = merge(copy.deepcopy(view)).eval()  # peer k's adapter merged into a dense plain model
        expected = _hf_greedy(merged, prompts, 6, pad)
        with stacked.serving(slice(k, k + 1)) as served:
            got = greedy_generate(served, prompts, 6, pad_id=pad, eos_id=None, batch_size=3)
        assert got == expected, f"peer {k}"
    # The adapters change the answers (else the test above proves little), and base_model is the base.
    with base_model(stacked) as base:
        assert base is not None
        got_base = greedy_generate(base, prompts, 6, pad_id=pad, eos_id=None, batch_size=4)
    assert got_base == _hf_greedy(plain, prompts, 6, pad)
    assert got_base != _hf_greedy(merged, prompts, 6, pad)
    assert type(stacked.model.get_submodule(next(iter(stacked.layers)))).__name__ == "StackedDoRALinear"  # restored


# ------------------------------------------------------------------------- accuracy on chosen outputs
class _Scripted(torch.nn.Module):
    """A 'model' whose generate appends the scripted token ids to each (left-padded) row."""

    def __init__(self, replies: list[list[int]], pad: int) -> None:
        super().__init__()
        self.replies, self.pad, self.calls = replies, pad, []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **_: object) -> torch.Tensor:
        self.calls.append((input_ids.clone(), attention_mask.clone(), max_new_tokens))
        width = max(len(r) for r in self.replies)
        tail = torch.tensor([r + [self.pad] * (width - len(r)) for r in self.replies[: input_ids.shape[0]]])
        self.replies = self.replies[input_ids.shape[0]:]
        return torch.cat([input_ids, tail], dim=1)


def test_generative_accuracy_counts_normalised_matches() -> None:
    tok = word_tokenizer(CHATML)
    ids = tok.convert_tokens_to_ids
    items = [PromptAnswer(prompt=[ids("name"), ids("a"), ids("fruit")], answer=[ids("apple")]),
             PromptAnswer(prompt=[ids("fruit")], answer=[ids("banana")]),
             PromptAnswer(prompt=[ids("car"), ids("part")], answer=[ids("wheel")])]
    eos = tok.eos_token_id
    replies = [[ids("apple"), eos, ids("cherry")],  # right, then eos: the rest is cut
               [ids("cherry"), ids("banana")],      # wrong first word
               [ids("wheel"), ids("and"), ids("more")]]  # right first word of a one-word reference
    scripted = _Scripted(replies, tok.pad_token_id)
    result = generate_answers(scripted, tok, items, batch_size=2)
    assert result.answers == ["apple", "cherry banana", "wheel and more"]
    assert result.correct == [True, False, True] and result.accuracy == pytest.approx(2 / 3)
    first_ids, first_mask, max_new = scripted.calls[0]
    assert max_new == 1 + 4  # longest reference (1 token) + the margin
    assert first_mask.tolist() == [[1, 1, 1], [0, 0, 1]]  # left padding
    assert first_ids[1].tolist() == [tok.pad_token_id, tok.pad_token_id, ids("fruit")]


def test_sft_evaluate_reports_generative_accuracy_next_to_answer_perplexity(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = word_tokenizer(CHATML)
    task = SFTTask()
    rows = task.tokenize(Dataset.from_dict({MESSAGES: [chat("name a fruit", "apple"), chat("name a car part", "wheel")]}), tok, 64).to_list()
    batch = task.collator(tok)(rows)
    model = _tiny_lm(len(tok), tok.pad_token_id)
    monkeypatch.setattr("d2ora.data.sft_task.generate_answers",
                        lambda m, t, items, device="cpu": type("G", (), {"accuracy": 0.5})())
    scores = task.evaluate(model, [batch])
    assert set(scores) >= {ANSWER_PERPLEXITY, GENERATIVE_ACCURACY} and scores[GENERATIVE_ACCURACY] == 0.5
    # A peer's own-split score: the same answer perplexity, no greedy answers, the task itself untouched.
    loss_only = task.loss_metrics_only().evaluate(model, [batch])
    assert GENERATIVE_ACCURACY not in loss_only and loss_only[ANSWER_PERPLEXITY] == pytest.approx(scores[ANSWER_PERPLEXITY])
    assert task.generate_examples > 0 and GENERATIVE_ACCURACY in task.evaluate(model, [batch])
    task.generate_examples = 0
    assert GENERATIVE_ACCURACY not in task.evaluate(model, [batch])


# --------------------------------------------------------------------------------- a 1-round run
def test_one_round_simulate_with_sft_reports_generative_accuracy_and_sample_answers(tiny_llama_dir: str, tmp_path: Path) -> None:  # noqa: F811
    from typer.testing import CliRunner

    from d2ora.cli import app

    sets = {"model.task": "sft", "data.source": "bbc_news_sections", "model.name": tiny_llama_dir, "network.peers": 3,
            "run.rounds": 1, "run.local_steps": 1, "optim.batch_size": 2, "data.max_length": 128, "data.max_train_samples": 40,
            "data.max_test_samples": 4, "data.min_partition_size": 5, "adapter.r": 2, "run.output_dir": str(tmp_path),
            "run.save_merged": False, "run.tensorboard": True, "run.generate_examples": 3}
    args = ["simulate", *[part for k, v in sets.items() for part in ("--set", f"{k}={v}")]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    accuracy = summary["final"]["consensus_test"][GENERATIVE_ACCURACY]
    assert 0.0 <= accuracy <= 1.0 and summary["metric"] == ANSWER_PERPLEXITY
    # Every peer answers the shared test prompts; on its own validation split it is scored by perplexity only.
    assert all(GENERATIVE_ACCURACY in row for row in summary["final"]["peer_test"])
    assert all(GENERATIVE_ACCURACY not in row and ANSWER_PERPLEXITY in row for row in summary["final"]["peer_val"] if row)
    samples = summary["samples"]
    assert len(samples) == 3 and all(s["base"] is not None and s["consensus"] is not None for s in samples)
    # The word tokenizer knows none of the section names ([UNK], dropped as special): references read
    # as blank here; their text is checked against the chat rendering above.
    assert all(isinstance(s["reference"], str) and isinstance(s["peer0"], str) for s in samples)
    report = (tmp_path / "report.md").read_text()
    assert "## Generated answers" in report and "| prompt | reference | base | consensus | peer 0 |" in report
    assert "consensus generative accuracy" in report  # the per-round results table's column
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert "test/consensus_generative_accuracy" in board.Tags()["scalars"]
