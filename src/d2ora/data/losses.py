"""Causal-LM cross-entropy in chunks of tokens: the full fp32 logits tensor is never formed.

For P peers of b rows of T tokens and a vocabulary V, the plain loss holds ``P·b·T·V`` fp32 logits,
their log-softmax for the backward and then their gradient: with SmolLM2's V = 49,152, four peers
of 8 x 512 tokens that is 3.2 GB per copy. Here the model runs up to its last hidden state only
(``model.base_model``, which HF causal LMs feed to ``model.get_output_embeddings()``), and the
head + cross-entropy run over ``chunk_tokens`` target tokens at a time under non-reentrant
activation checkpointing, so the forward keeps no chunk's logits and the backward recomputes one
chunk's logits at a time. Only target tokens (label != IGNORE_INDEX) go through the head: padding
costs no vocabulary-sized work. The sums per peer equal the full computation up to float rounding
(summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # as d2ora.data.tasks (kept here so tasks can import this module)
CHUNK_TOKENS = 1024
#: Config fields of HF causal LMs whose logits are *not* ``lm_head(last hidden state)`` (Gemma-2's
#: soft-capping, Cohere's logit scale, Granite's divisor): such models take the full-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model: nn.Module) -> nn.Linear | None:
    """The LM head the chunked loss can apply itself, or None when the model's logits are not a plain
    ``nn.Linear`` of ``model.base_model``'s last hidden state (a stacked per-peer head, an adapted
    head, a logit transform, a model that is not a HF causal LM)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear:
        return None
    if getattr(model, "base_model", model) is model:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) is not None for key in _LOGIT_TRANSFORMS):
        return None
    return head


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="none")


def chunked_token_nll(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, groups: int,
                      chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(groups,)`` next-token NLL sums (fp32) and target counts of a group-major batch.

    ``hidden (N, T, H)``: the last hidden states; ``labels (N, T)``, ``IGNORE_INDEX`` where nothing is
    learned; position t predicts label t+1; rows ``[k·N/groups, (k+1)·N/groups)`` are group k's;
    ``chunk_tokens`` target tokens go through the head at a time (None: :data:`CHUNK_TOKENS`).
    """
    chunk_tokens = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    rows = hidden.shape[0]
    if rows % groups:
        raise ValueError(f"batch of {rows} rows does not split evenly over {groups} peers")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    counts = mask.reshape(groups, -1).sum(dim=1)
    row, col = mask.nonzero(as_tuple=True)
    picked = hidden[:, :-1][row, col]  # (M, H): the target tokens' states only
    wanted = targets[row, col]
    owner = row // (rows // groups)
    sums = torch.zeros(groups, dtype=torch.float32, device=hidden.device)
    replay = torch.is_grad_enabled() and (picked.requires_grad or head.weight.requires_grad)
    for start in range(0, picked.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if replay:  # keep only the chunk's inputs; its logits are recomputed in the backward
            nll = checkpoint(_chunk_nll, picked[part], wanted[part], head.weight, head.bias, use_reentrant=False)
        else:
            nll = _chunk_nll(picked[part], wanted[part], head.weight, head.bias)
        sums = sums.index_add(0, owner[part], nll)
    return sums, counts


def full_token_nll(logits: torch.Tensor, labels: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`chunked_token_nll` from full ``(N, T, V)`` logits (models without a plain head)."""
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.reshape(groups, -1).sum(dim=1), (targets != IGNORE_INDEX).reshape(groups, -1).sum(dim=1)


def peer_token_nll(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, groups: int,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group NLL sums and target counts of ``model`` on ``inputs``; chunked through the head when
    the model allows it (:func:`output_head`), from the model's full logits otherwise."""
    head = output_head(model)
    if head is None:
        return full_token_nll(model(**inputs).logits, labels, groups)
    hidden = model.base_model(**inputs).last_hidden_state
    return chunked_token_nll(hidden, head, labels, groups, chunk_tokens)
