"""Stage 2 — T2V: salient text-guided, layer-wise rank-and-drop (PyramidDrop with salient queries).

At a drop layer the text queries attend (softmax over every key, causal and padding mask applied) and the
probabilities, averaged over heads and over the queries, score each visual token. The top
floor(r * V) visual tokens survive in their original order. Ties go to the lower position.
"""

from __future__ import annotations

import torch

from duet_export.stages.v2v import rank_descending

__all__ = ["t2v_keep", "t2v_scores"]


def t2v_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    allowed: torch.Tensor,
    query_valid: torch.Tensor,
    visual_index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Score the visual tokens of a batch.

    queries [B, H, Q, d] (rotary applied), keys [B, Hkv, T, d] (rotary applied; repeated to H heads here),
    allowed [B, Q, T] (which keys each query may see), query_valid [B, Q] (padding rows of Q are False),
    visual_index [B, V] (sequence positions of the visual tokens). Returns [B, V] float32 scores.
    """
    heads, kv_heads = queries.shape[1], keys.shape[1]
    if heads != kv_heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scale  # [B, H, Q, T]
    logits = logits.masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1).mean(dim=1)  # [B, Q, T]
    probs = torch.gather(probs, 2, visual_index.unsqueeze(1).expand(-1, probs.shape[1], -1))  # [B, Q, V]
    weights = query_valid.float().unsqueeze(-1)
    return (probs * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def t2v_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions (within the visual block, ascending) of the `keep` best-scored visual tokens."""
    return torch.sort(rank_descending(scores)[:, :keep], dim=-1).values
