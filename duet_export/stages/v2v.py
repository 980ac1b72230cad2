"""Stage 1 — V2V: vision-only, redundancy-aware merge (VisionZip with a cluster width).

Works on one vision-encoder layer: its output hidden states `H` [B, 1+N, D] (CLS at 0), the attention the
CLS query pays to every patch (summed over heads) `cls_attention` [B, N], and that layer's keys averaged over
heads `keys` [B, 1+N, d]. Ties in the scores are broken by the lower patch index, here and in the ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["V2VResult", "cls_attention_and_keys", "rank_descending", "v2v_merge", "v2v_select"]


@dataclass
class V2VResult:
    """Stage-1 output and what it kept, in 0-based patch indices (CLS excluded)."""

    tokens: torch.Tensor  # [B, K_d + K_c, D]: CLS, dominant patches in position order, contextual tokens
    dominant: torch.Tensor  # [B, K_d - 1] patch indices, ascending
    anchors: torch.Tensor  # [B, K_c] patch indices, in anchor order
    members: torch.Tensor  # [B, P - K_c] patch indices of merged (non-anchor) pre-selected patches
    assignment: torch.Tensor  # [B, P - K_c] index (0..K_c-1) of the anchor each member merged into
    # [B, V] patch index behind each token of `tokens`, for families that keep tokens in position order
    # (Qwen2.5-VL: no CLS, each contextual token in its anchor's slot); None for the layout above.
    kept: torch.Tensor | None = None


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices that sort `scores` descending along the last dim; equal scores keep the lower index first."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def cls_attention_and_keys(
    layer_input: torch.Tensor,
    q_proj: torch.nn.Module,
    k_proj: torch.nn.Module,
    num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS-row attention probabilities summed over heads [B, N] and head-averaged keys [B, 1+N, d].

    `layer_input` is the *normed* input of the chosen attention layer. Only the CLS query row is computed
    (1 x (1+N) per head), so the encoder itself keeps running on SDPA. The projections run in the model's
    dtype, the scores in float32 whatever it is, so that a half-precision model ranks patches as its
    float32 twin does except on true near-ties.
    """
    b, t, _ = layer_input.shape
    q = q_proj(layer_input[:, :1]).view(b, 1, num_heads, -1).transpose(1, 2)  # [B, h, 1, d]
    k = k_proj(layer_input).view(b, t, num_heads, -1).transpose(1, 2)  # [B, h, T, d]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    probs = torch.softmax(logits, dim=-1)  # [B, h, 1, T] float32
    cls_attention = probs.sum(dim=1)[:, 0, 1:]
    return cls_attention, k.mean(dim=1)


def v2v_select(
    cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int, cluster_width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The index part of Stage 1: (dominant, anchors, members, assignment), all 0-based patch indices."""
    b, _n = cls_attention.shape
    order = rank_descending(cls_attention)
    dominant_idx = torch.sort(order[:, : dominant - 1], dim=-1).values
    rest = order[:, dominant - 1 :]
    m = rest.shape[1]
    if contextual == 0:
        empty = order.new_zeros((b, 0))
        return dominant_idx, empty, empty, empty
    pool_size = min(max(1, cluster_width * contextual), m)
    pool = rest[:, :pool_size]
    step = max(1, pool_size // contextual)
    anchor_pos = torch.arange(contextual, device=order.device) * step
    is_anchor = torch.zeros(pool_size, dtype=torch.bool, device=order.device)
    is_anchor[anchor_pos] = True
    anchors = pool[:, anchor_pos]
    members = pool[:, ~is_anchor]
    patch_keys = F.normalize(keys[:, 1:].float(), dim=-1, eps=1e-12)
    anchor_keys = torch.gather(patch_keys, 1, anchors.unsqueeze(-1).expand(-1, -1, patch_keys.shape[-1]))
    member_keys = torch.gather(patch_keys, 1, members.unsqueeze(-1).expand(-1, -1, patch_keys.shape[-1]))
    similarity = torch.bmm(member_keys, anchor_keys.transpose(1, 2))  # [B, P-K_c, K_c]
    assignment = similarity.argmax(dim=-1)  # first maximum wins: the earlier anchor
    return dominant_idx, anchors, members, assignment


def _gather_tokens(hidden: torch.Tensor, patch_idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(hidden, 1, (patch_idx + 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def v2v_merge(
    hidden: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    cluster_width: int = 4,
) -> V2VResult:
    """Stage 1 on a batch: [CLS, dominant patches in order] ++ [contextual tokens in anchor order].

    Contextual token i = H[anchor_i] + mean(H[members assigned to i]) (the anchor alone if none was).
    Selection runs without gradient; the output is differentiable in `hidden`.
    """
    with torch.no_grad():
        dominant_idx, anchors, members, assignment = v2v_select(
            cls_attention, keys, dominant, contextual, cluster_width
        )
    parts = [hidden[:, :1], _gather_tokens(hidden, dominant_idx)]
    if contextual:
        one_hot = F.one_hot(assignment, contextual).to(hidden.dtype)  # [B, P-K_c, K_c]
        counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [B, K_c, 1]
        merged = torch.bmm(one_hot.transpose(1, 2), _gather_tokens(hidden, members)) / counts
        parts.append(_gather_tokens(hidden, anchors) + merged)
    return V2VResult(
        tokens=torch.cat(parts, dim=1),
        dominant=dominant_idx,
        anchors=anchors,
        members=members,
        assignment=assignment,
    )
