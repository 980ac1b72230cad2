"""Stage 2 — T2V: salient text-guided, layer-wise rank-and-drop (PyramidDrop with salient queries).

At a drop layer the text queries attend (softmax over every key, causal and padding mask applied) and the
probabilities, averaged over heads and over the queries, score each visual token. The top
floor(r * V) visual tokens survive in their original order. Ties go to the lower position.

`t2v_drop` is the whole stage for one layer and is what the ONNX graph shows as one `duet.T2VDrop` node:
its outputs have shapes fixed by the budget (no data-dependent sizes), so it exports with static shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from duet_export.stages.v2v import rank_descending

__all__ = ["compact", "gather_rows", "rotate_half", "select_queries", "t2v_drop", "t2v_keep", "t2v_scores"]

IGNORE_INDEX = -100


def compact(flags: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] ascending column indices of the True entries of a [B, T] mask holding `count` per row."""
    return torch.nonzero(flags, as_tuple=False)[:, 1].view(flags.shape[0], count)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [B, H, T, d] with [B, T, d] cos/sin (the Llama/Qwen "rotate half" layout)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def select_queries(
    visual: torch.Tensor,
    real: torch.Tensor,
    query: torch.Tensor | None,
    labels: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """[B, T] bool: the text tokens that score the visual tokens (ALGORITHM.md, Stage 2).

    `real` marks tokens that may query (not padding, part of the prompt); `query` marks salient words.
    Queries come after the last visual token; in training (labels given) only label-ignored tokens qualify
    and the final prompt token is the one before the first answer token.
    """
    b, t = visual.shape
    index = torch.arange(t, device=visual.device).expand(b, -1)
    last_visual = torch.where(visual, index, -1).max(dim=1, keepdim=True).values
    eligible = (index > last_visual) & real
    if labels is not None:
        answer = labels != IGNORE_INDEX
        eligible &= ~answer
        first_answer = torch.where(answer, index, t).min(dim=1, keepdim=True).values
        final = torch.where(eligible & (index < first_answer), index, -1).max(dim=1, keepdim=True).values
    else:
        final = torch.where(real, index, -1).max(dim=1, keepdim=True).values
    if mode == "all" or (mode == "salient" and query is None):
        chosen = eligible
    elif mode == "salient":
        chosen = eligible & query
    else:
        chosen = torch.zeros_like(eligible)
    chosen = chosen | (index == final)
    # No eligible token at all (nothing after the image): the last real token queries.
    last_real = index == torch.where(real, index, -1).max(dim=1, keepdim=True).values
    return chosen | (~chosen.any(dim=1, keepdim=True) & last_real)


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
    allowed [B, Q, T] (which keys each query may see), query_valid [B, Q] (rows that count),
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


def gather_rows(x: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """x[b, index[b]] for [B, T] or [B, T, D] tensors (None stays None)."""
    if x is None:
        return None
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def t2v_drop(
    normed: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    real: torch.Tensor,
    visual: torch.Tensor,
    query: torch.Tensor | None,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    visual_tokens: int,
    keep: int,
    mode: str,
    labels: torch.Tensor | None = None,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 2 at one drop layer: [B, T - V + keep] indices of the sequence positions that stay.

    `normed` is the hidden state entering the layer after that layer's input norm; q/k weights are the
    layer's projections; cos/sin the rotary tables at the current positions. `real` marks tokens allowed to
    query, `pad` (default: `real`) the keys that are not padding. Only the text rows are projected to queries.
    """
    b, t, _ = normed.shape
    pad = real if pad is None else pad
    text_rows = t - visual_tokens
    if keep == 0:
        return compact(~visual, text_rows)
    chosen = select_queries(visual, real, query, labels, mode)
    text_index = compact(~visual, text_rows)
    q = F.linear(gather_rows(normed, text_index), q_weight, q_bias).view(b, text_rows, num_heads, head_dim)
    k = F.linear(normed, k_weight, k_bias).view(b, t, num_kv_heads, head_dim)
    q = rotate_half(q.transpose(1, 2), gather_rows(cos, text_index), gather_rows(sin, text_index))
    k = rotate_half(k.transpose(1, 2), cos, sin)
    allowed = (
        torch.arange(t, device=normed.device).view(1, 1, t) <= text_index.unsqueeze(-1)
    ) & pad.unsqueeze(1)
    visual_index = compact(visual, visual_tokens)
    scores = t2v_scores(q, k, allowed, gather_rows(chosen, text_index), visual_index, scale)
    kept = torch.gather(visual_index, 1, t2v_keep(scores, keep))
    stays = (~visual).scatter(1, kept, True)
    return compact(stays, text_rows + keep)
