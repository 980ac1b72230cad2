"""Fuse attention into onnxruntime's `com.microsoft.MultiHeadAttention` (the `cuda` target)."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

__all__ = ["FUSED_OP", "FuseAttentionPass"]

FUSED_OP = ("com.microsoft", "MultiHeadAttention")
_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate SDPA node


class _RepeatedKeyTo4D(pattern.RewriteRuleClassBase):
    """Reshape(K repeated per query group [B, KV, R, S, D] -> [B*KV*R, S, D]) becomes the same Reshape of
    its 4-D form [B, KV*R, S, D]: the layout onnxscript's SDPA rule matches. Values are unchanged."""

    def pattern(self, op, repeated, shape):
        return op.Reshape(repeated, shape, _outputs=["merged"])

    def check(self, context, repeated, shape, merged, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if repeated.shape is None or merged.shape is None:
            return result.fail("shapes unknown")
        if len(repeated.shape) != 5 or not all(isinstance(d, int) for d in repeated.shape):
            return result.fail("not a static 5-D tensor")
        b, kv, rep, s, d = repeated.shape
        if list(merged.shape) != [b * kv * rep, s, d]:
            return result.fail("not a merge of batch, key/value heads and repeats")
        return result

    def rewrite(self, op, repeated, shape, merged, **_):
        b, kv, rep, s, d = repeated.shape
        four = op.Reshape(repeated, op.Constant(value_ints=[b, kv * rep, s, d]))
        four.shape, four.dtype = ir.Shape([b, kv * rep, s, d]), repeated.dtype
        return op.Reshape(four, shape)


class FuseAttentionPass(ir.passes.InPlacePass):
    """Rewrite each attention block (Q·Kᵀ, scale, additive mask, Softmax, ·V) into one
    `com.microsoft.MultiHeadAttention` node, the op onnxruntime's CUDA provider runs with its fused kernels
    (flash / memory-efficient attention) instead of materialising the score matrix.

    Rules:
    1. The matching is onnxscript's ORT fusion rules, not ours: `fuse_sdpa` recognises scaled dot-product
       attention however the scale is spread over Q, K and the scores, with or without an additive mask;
       `replace_sdpa_by_mha` turns each match into MultiHeadAttention ([B, S, H·D] query/key/value, the
       mask as `attention_bias`, the scale kept).
    2. A key whose heads were repeated for grouped-query attention (Unsqueeze, Expand, then a Reshape to
       [B·H, S, D]) first gets the 4-D [B, H, S, D] Reshape the SDPA rule expects; the repetition stays.
    3. Only static shapes fuse (run it after `fix-shapes`). Softmaxes not followed by a product with V
       (Stage 1's CLS attention, Stage 2's text-to-visual scores) are left alone.
    4. Every intermediate SDPA node must become MultiHeadAttention: one left over (which no runtime has a
       kernel for) is an error naming it, never a silent result.
    Does not fire on a graph without attention.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ShapeInferencePass()(model)  # the rules check shapes
        reshaped = pattern.RewriteRuleSet([_RepeatedKeyTo4D.rule()]).apply_to_model(model)
        found = fuse_sdpa(model, apply_shape_inference=True)
        if not found:
            return ir.passes.PassResult(model, modified=bool(reshaped))
        replace_sdpa_by_mha(model)
        left = [n.name for n in model.graph if n.domain == _FUSION_DOMAIN]
        if left:
            raise ir.passes.PassError(f"attention nodes left unfused: {', '.join(left[:3])}")
        model.opset_imports.pop(_FUSION_DOMAIN, None)
        model.opset_imports.setdefault(FUSED_OP[0], 1)
        ShapeInferencePass()(model)
        return ir.passes.PassResult(model, modified=True)
