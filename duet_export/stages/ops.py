"""The stages as single graph nodes: eager PyTorch normally, a `duet` custom node during ONNX export.

Under `torch.onnx.export(..., dynamo=True)` each call becomes one `duet.V2VMerge` / `duet.T2VDrop` node
carrying its budget as attributes; `duet_export.export.functions` then attaches an ONNX function body to
each, so any onnxruntime can run the graph as exported.
"""

from __future__ import annotations

import torch

from duet_export.stages.t2v import t2v_drop
from duet_export.stages.v2v import v2v_merge

__all__ = ["DOMAIN", "t2v_drop_node", "v2v_merge_node"]

DOMAIN = "duet"
QUERY_MODE_CODES = {"salient": 0, "all": 1, "last": 2}


def v2v_merge_node(
    hidden: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    cluster_width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1 -> (tokens [n, K_d+K_c, D], dominant patch indices [n, K_d-1], anchor patch indices [n, K_c])."""
    if torch.onnx.is_in_onnx_export():
        n, _, d = hidden.shape
        outs = torch.onnx.ops.symbolic_multi_out(
            f"{DOMAIN}::V2VMerge",
            (hidden, cls_attention, keys),
            {"dominant": dominant, "contextual": contextual, "cluster_width": cluster_width},
            dtypes=(hidden.dtype, torch.int64, torch.int64),
            shapes=((n, dominant + contextual, d), (n, dominant - 1), (n, contextual)),
            version=1,
        )
        return tuple(outs)
    out = v2v_merge(hidden, cls_attention, keys, dominant, contextual, cluster_width)
    return out.tokens, out.dominant, out.anchors


def t2v_drop_node(
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
    layer: int,
    labels: torch.Tensor | None = None,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 2 at one layer -> [B, T - V + keep] sequence positions that stay.

    The node takes the projections transposed ([in, out]), the layout the layer's own MatMuls hold after
    export, so that the graph stores each q/k weight once, not a second copy for Stage 2."""
    if torch.onnx.is_in_onnx_export():
        b, t, _ = normed.shape
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::T2VDrop",
            (normed, q_weight.t(), q_bias, k_weight.t(), k_bias, cos, sin, real, visual, query),
            {
                "num_heads": num_heads,
                "num_kv_heads": num_kv_heads,
                "head_dim": head_dim,
                "scale": float(scale),
                "visual_tokens": visual_tokens,
                "keep": keep,
                "query_mode": mode,
                "layer": layer,
            },
            dtype=torch.int64,
            shape=(b, t - visual_tokens + keep),
            version=1,
        )
    return t2v_drop(
        normed, q_weight, q_bias, k_weight, k_bias, cos, sin, real, visual, query,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=scale,
        visual_tokens=visual_tokens, keep=keep, mode=mode, labels=labels, pad=pad,
    )  # fmt: skip
