"""FuseAttentionPass: attention blocks as the exporter writes them become one MultiHeadAttention node that
computes the same thing; other softmaxes stay."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from duet_export.passes.fuse_attention import FUSED_OP, FuseAttentionPass
from duet_export.passes.testing import make_model, run_model

B, H, S, D = 2, 4, 5, 8


def _const(name: str, values, dtype=np.int64) -> helper.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, dtype), name)
    )


def _attention_model(kv_heads: int = H) -> ir.Model:
    """The exporter's attention: q and k scaled by d^-1/4 each, k transposed through a 3-D reshape,
    an additive [B, 1, S, S] mask, Softmax, ·V. With kv_heads < H the key is repeated per query group
    (Unsqueeze, Expand, Reshape), as transformers' repeat_kv exports."""
    rep = H // kv_heads
    nodes = [
        _const("scale", np.float32(D**-0.25), np.float32),
        _const("shape3", [B * H, S, D]),
        _const("shape4t", [B, H, D, S]),
    ]
    key = "k"
    if rep > 1:
        nodes += [
            _const("axis2", [2]),
            _const("expand_to", [B, kv_heads, rep, S, D]),
            helper.make_node("Unsqueeze", ["k", "axis2"], ["k5"]),
            helper.make_node("Expand", ["k5", "expand_to"], ["k_rep"]),
        ]
        key = "k_rep"
    nodes += [
        helper.make_node("Reshape", [key, "shape3"], ["k3"]),
        helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["k3t", "shape4t"], ["kt"]),
        helper.make_node("Mul", ["q", "scale"], ["qs"]),
        helper.make_node("Mul", ["kt", "scale"], ["kts"]),
        helper.make_node("MatMul", ["qs", "kts"], ["scores"]),
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["out"]),
    ]
    f = TensorProto.FLOAT
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("q", f, [B, H, S, D]),
            helper.make_tensor_value_info("k", f, [B, kv_heads, S, D]),
            helper.make_tensor_value_info("v", f, [B, H, S, D]),
            helper.make_tensor_value_info("mask", f, [B, 1, S, S]),
        ],
        [helper.make_tensor_value_info("out", f, [B, H, S, D])],
    )


def _feeds(kv_heads: int = H, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    allowed = np.tril(np.ones((S, S), dtype=bool))[None, None] & (rng.random((B, 1, 1, S)) > 0.3)
    allowed |= np.eye(S, dtype=bool)  # every row attends to itself, as the exported masks guarantee
    return {
        "q": rng.standard_normal((B, H, S, D)).astype(np.float32),
        "k": rng.standard_normal((B, kv_heads, S, D)).astype(np.float32),
        "v": rng.standard_normal((B, H, S, D)).astype(np.float32),
        "mask": np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32),
    }


def _ops(model: ir.Model) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in model.graph]


@pytest.mark.parametrize("kv_heads", [H, 2], ids=["mha", "grouped-query"])
def test_attention_becomes_one_multihead_attention_node_with_the_same_output(kv_heads):
    model = _attention_model(kv_heads)
    feeds = _feeds(kv_heads)
    before = run_model(model, feeds)[0]
    result = FuseAttentionPass()(model)
    assert result.modified
    ops = _ops(model)
    assert ops.count(FUSED_OP) == 1
    assert ("", "Softmax") not in ops and ("", "MatMul") not in ops
    assert model.opset_imports[FUSED_OP[0]] == 1
    after = run_model(model, feeds)[0]
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)


def test_softmax_without_a_value_product_is_left_alone():
    """Stage 1's CLS attention and Stage 2's scores end in Softmax (then a reduction), not in ·V."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        _const("axes", [1]),
        helper.make_node("ReduceMean", ["probs", "axes"], ["out"], keepdims=0),
    ]
    model = make_model(
        nodes,
        [
            helper.make_tensor_value_info("q", f, [B, H, S, D]),
            helper.make_tensor_value_info("kt", f, [B, H, D, S]),
        ],
        [helper.make_tensor_value_info("out", f, [B, S, S])],
    )
    before = _ops(model)
    assert not FuseAttentionPass()(model).modified
    assert _ops(model) == before
