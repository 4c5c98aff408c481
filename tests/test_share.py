"""Personalization (share: direction | magnitude | lora_a): what travels, what stays, and a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2ora.engine.exchange import InMemoryExchange, Routes
from d2ora.engine.layout import AdapterLayout
from d2ora.engine.metrics_log import read_rows
from d2ora.engine.share import SharedPartsExchange, SharePolicy, shared_mask
from d2ora.recipes.simulate import simulate
from d2ora.topology import build_topology, mixing_matrix
from tests.conftest import simulate_config

LAYOUT = AdapterLayout.build(
    [("q", "lora_A", "lora_A", (2, 5)), ("q", "lora_B", "lora_B", (4, 2)), ("q", "lora_magnitude_vector", "lora_magnitude_vector", (4,)),
     ("head", "dense", "weight", (3, 4))],
    {"q": 2.0}, torch.float32,
)


@pytest.mark.parametrize(("share", "sizes"), [
    ("all", (10, 8, 4, 12)), ("direction", (10, 8, 0, 12)), ("magnitude", (0, 0, 4, 12)), ("lora_a", (10, 0, 0, 12)),
])
def test_shared_entries_per_mode(share: str, sizes: tuple[int, ...]) -> None:
    mask = shared_mask(LAYOUT, share)
    got = tuple(int(mask[e.offset : e.offset + e.numel].sum()) for e in LAYOUT.entries)
    assert got == sizes
    assert SharePolicy(LAYOUT, share).message_numel == sum(sizes)
    with pytest.raises(ValueError, match="unknown share 'half'"):
        shared_mask(LAYOUT, "half")


def test_exchange_sends_the_shared_entries_and_completes_with_the_receivers_own() -> None:
    weights = torch.as_tensor(mixing_matrix(build_topology("ring", 4), "metropolis_hastings"), dtype=torch.float32)
    routes = Routes(weights)
    mask = shared_mask(LAYOUT, "direction")
    exchange = SharedPartsExchange(InMemoryExchange(routes, range(4)), mask)
    outgoing = torch.randn(4, LAYOUT.numel)
    inbox = exchange.exchange(outgoing, 1, 0)
    assert inbox.payload_bytes == {p: 2 * int(mask.sum()) * 4 for p in range(4)}  # 2 neighbours, fp32
    for (sender, receiver), whole in inbox.messages.items():
        torch.testing.assert_close(whole[mask], outgoing[sender][mask])
        torch.testing.assert_close(whole[~mask], outgoing[receiver][~mask])


@pytest.mark.parametrize(("changes", "message"), [
    ({"share": "direction", "mixer": "dora_exact"}, "needs network.share: all"),
    ({"share": "lora_a", "mixer": "decaf"}, "re-bases"),
    ({"share": "magnitude", "mixer": "d2ora", "method": "lora"}, "has none"),
    ({"share": "direction", "mixer": "local"}, "send nothing"),
    ({"share": "everything"}, "unknown share"),
])
def test_config_refuses_undefined_splits(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate_config(**changes)


TINY = {
    "peers": 4, "rounds": 1, "local_steps": 2, "batch_size": 2, "max_length": 24, "max_train_samples": 90,
    "max_test_samples": 12, "eval_batch_size": 12, "min_partition_size": 5, "r": 2, "lr": 3e-3,
    "save_merged": False, "tensorboard": False, "eval_peers": False,
}


def peer_tensors(out: Path, peer: int) -> dict[str, torch.Tensor]:
    return load_file(out / "adapters" / f"peer-{peer}" / "adapter_model.safetensors")


def test_fedavg_sharing_the_direction_agrees_on_b_a_and_head_and_keeps_each_magnitude(tmp_path: Path) -> None:
    """FedAvg with share: direction, signed: after one round every peer holds the server's B, A and
    head, each keeps its own m; messages carry the shared entries only and all pass the checks."""
    summary = simulate(simulate_config(**TINY, mixer="fedavg", share="direction", trust="simulated", output_dir=tmp_path))
    assert summary["trust"]["rejected_total"] == 0
    peers = [peer_tensors(tmp_path, p) for p in range(4)]
    magnitude = [k for k in peers[0] if "magnitude" in k]
    shared = [k for k in peers[0] if "magnitude" not in k]
    assert magnitude and shared
    for key in shared:
        for other in peers[1:]:
            torch.testing.assert_close(other[key], peers[0][key])
    assert all(not torch.equal(peers[1][k], peers[0][k]) for k in magnitude)
    total_magnitudes = sum(peers[0][k].numel() for k in magnitude)
    per_message = summary["message_bytes"]
    assert per_message == 4 * (summary["trainable_params_per_peer"] - total_magnitudes)
    assert read_rows(tmp_path)[-1]["bytes_sent_total"] == 4 * 3 * per_message
    assert read_rows(tmp_path)[-1]["mean_peer_val"]["accuracy"] is not None
