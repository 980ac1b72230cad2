"""ONNX function bodies for the `duet` nodes, built for each node's own budget and shapes.

Every body uses only standard ONNX ops with constant shapes (opset <= 19, no TopK, no NonZero, no
Compress), so the same body serves two purposes:

1. attached to the model as a function (overload per node), it lets any onnxruntime run the graph with
   the custom nodes in place (onnxruntime inlines a function whose op has no kernel);
2. inlined by the `lower` pass, it is the static graph that MIGraphX and other static compilers take.

Selection is written without sorting: a token's rank is the number of tokens that beat it (a higher score,
or an equal score at a lower index) — exactly the order of PyTorch's stable descending sort — and a
"compaction" turns a boolean mask with a known number of hits into their ascending indices with a
cumulative sum and a one-hot product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from duet_export.stages.ops import DOMAIN

__all__ = ["FUNCTION_OPSET", "attach_functions", "t2v_function", "v2v_function"]

FUNCTION_OPSET = 18
_FLOAT_MIN = float(np.finfo(np.float32).min)


@dataclass
class _Body:
    """A tiny node builder: `b.op("MatMul", x, y)` appends a node and returns its output name."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    count: int = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [f"_{op_type.lower()}{self.count}_{i}" for i in range(outputs)]
        self.count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=onnx.numpy_helper.from_array(arr))

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def scalar(self, value: int) -> str:
        return self.const(np.int64(value))

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.ints(*axes))

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def gather_rows(self, x: str, index: str, shape: tuple[int, ...]) -> str:
        """x[b, index[b, i], ...] along axis 1 (GatherElements with the index broadcast to `shape`)."""
        expanded = (
            self.op("Expand", self.unsqueeze(index, 2), self.ints(*shape)) if len(shape) == 3 else index
        )
        return self.op("GatherElements", x, expanded, axis=1)

    def compact(self, flags: str, length: int, count: int) -> str:
        """[B, count] ascending indices of the True entries of [B, length] `flags` (count per row)."""
        if count == 0:
            raise ValueError("compact() of zero entries")
        slot = self.op(
            "Sub", self.op("CumSum", self.cast(flags, onnx.TensorProto.INT64), self.scalar(1)), self.ints(1)
        )
        hit = self.op(
            "And",
            self.unsqueeze(flags, 2),
            self.op(
                "Equal",
                self.unsqueeze(slot, 2),
                self.const(np.arange(count, dtype=np.int64).reshape(1, 1, count)),
            ),
        )
        positions = self.const(np.arange(length, dtype=np.float32).reshape(1, length))
        picked = self.op("MatMul", positions, self.cast(hit, onnx.TensorProto.FLOAT))  # [B, 1, count]
        return self.cast(self.op("Squeeze", picked, self.ints(1)), onnx.TensorProto.INT64)

    def rank(self, scores: str, length: int) -> str:
        """[B, L] position of each entry in a stable descending sort of [B, L] `scores`."""
        s_i, s_j = self.unsqueeze(scores, 2), self.unsqueeze(scores, 1)
        index = np.arange(length)
        lower = self.const((index[:, None] < index[None, :]).reshape(1, length, length))
        beats = self.op("Or", self.op("Greater", s_i, s_j), self.op("And", self.op("Equal", s_i, s_j), lower))
        return self.op("ReduceSum", self.cast(beats, onnx.TensorProto.INT64), self.ints(1), keepdims=0)


def _function(
    name: str, overload: str, inputs: list[str], outputs: list[str], body: _Body
) -> onnx.FunctionProto:
    for i, node in enumerate(body.nodes):
        # Named after their op so that profiles and lowered graphs can attribute time to the stages.
        node.name = f"{name}.{overload}/{node.op_type}_{i}"
    fn = helper.make_function(
        DOMAIN, name, inputs, outputs, body.nodes, [helper.make_opsetid("", FUNCTION_OPSET)]
    )
    fn.overload = overload
    return fn


def v2v_function(
    overload: str,
    *,
    batch: int,
    patches: int,
    hidden: int,
    key_dim: int,
    dominant: int,
    contextual: int,
    cluster_width: int,
) -> onnx.FunctionProto:
    """Stage 1 as standard ops: (hidden [n,1+N,D], cls_attention [n,N], keys [n,1+N,d]) -> (tokens, dominant, anchors)."""
    b = _Body()
    n, big_n, d = batch, patches, hidden
    kd1 = dominant - 1
    rank = b.rank("cls_attention", big_n)
    patch_hidden = b.op("Slice", "hidden", b.ints(1), b.ints(big_n + 1), b.ints(1))
    parts = [b.op("Slice", "hidden", b.ints(0), b.ints(1), b.ints(1))]
    if kd1 > 0:
        dom_idx = b.compact(b.op("Less", rank, b.ints(kd1)), big_n, kd1)
        parts.append(b.gather_rows(patch_hidden, dom_idx, (n, kd1, d)))
    else:
        dom_idx = b.const(np.zeros((n, 0), np.int64))
    b.nodes.append(helper.make_node("Identity", [dom_idx], ["dominant"]))
    if contextual > 0:
        m = big_n - kd1
        pool = min(max(1, cluster_width * contextual), m)
        step = max(1, pool // contextual)
        targets = (kd1 + np.arange(contextual) * step).astype(np.int64).reshape(1, 1, contextual)
        is_slot = b.op("Equal", b.unsqueeze(rank, 2), b.const(targets))  # [n, N, K_c]
        positions = b.const(np.arange(big_n, dtype=np.float32).reshape(1, big_n))
        anchors_f = b.op("MatMul", positions, b.cast(is_slot, onnx.TensorProto.FLOAT))
        anchors = b.cast(b.op("Squeeze", anchors_f, b.ints(1)), onnx.TensorProto.INT64)
        b.nodes.append(helper.make_node("Identity", [anchors], ["anchors"]))
        in_pool = b.op(
            "And", b.op("GreaterOrEqual", rank, b.ints(kd1)), b.op("Less", rank, b.ints(kd1 + pool))
        )
        is_anchor = b.op(
            "Greater",
            b.op("ReduceSum", b.cast(is_slot, onnx.TensorProto.INT64), b.ints(2), keepdims=0),
            b.ints(0),
        )
        member = b.op("And", in_pool, b.op("Not", is_anchor))
        keys = b.cast(b.op("Slice", "keys", b.ints(1), b.ints(big_n + 1), b.ints(1)), onnx.TensorProto.FLOAT)
        norm = b.op("Sqrt", b.op("ReduceSum", b.op("Mul", keys, keys), b.ints(2), keepdims=1))
        unit = b.op("Div", keys, b.op("Max", norm, b.const(np.float32(1e-12))))
        anchor_keys = b.gather_rows(unit, anchors, (n, contextual, key_dim))
        sim = b.op("MatMul", unit, b.op("Transpose", anchor_keys, perm=[0, 2, 1]))  # [n, N, K_c]
        assign = b.op("ArgMax", sim, axis=2, keepdims=0, select_last_index=0)
        slots = b.const(np.arange(contextual, dtype=np.int64).reshape(1, 1, contextual))
        one_hot = b.op("And", b.op("Equal", b.unsqueeze(assign, 2), slots), b.unsqueeze(member, 2))
        one_hot = b.op("CastLike", one_hot, "hidden")
        counts = b.op("ReduceSum", one_hot, b.ints(1), keepdims=0)  # [n, K_c]
        counts = b.unsqueeze(b.op("Max", counts, b.op("CastLike", b.const(np.float32(1.0)), "hidden")), 2)
        summed = b.op("MatMul", b.op("Transpose", one_hot, perm=[0, 2, 1]), patch_hidden)
        anchor_hidden = b.gather_rows(patch_hidden, anchors, (n, contextual, d))
        parts.append(b.op("Add", anchor_hidden, b.op("Div", summed, counts)))
    else:
        b.nodes.append(helper.make_node("Identity", [b.const(np.zeros((n, 0), np.int64))], ["anchors"]))
    b.nodes.append(helper.make_node("Concat", parts, ["tokens"], axis=1))
    return _function(
        "V2VMerge", overload, ["hidden", "cls_attention", "keys"], ["tokens", "dominant", "anchors"], b
    )


def _rotate(b: _Body, x: str, cos: str, sin: str, half: int) -> str:
    x1 = b.op("Slice", x, b.ints(0), b.ints(half), b.ints(3))
    x2 = b.op("Slice", x, b.ints(half), b.ints(2 * half), b.ints(3))
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=3)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def t2v_function(
    overload: str,
    *,
    batch: int,
    length: int,
    hidden: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    visual_tokens: int,
    keep: int,
    query_mode: str,
    q_bias: bool,
    k_bias: bool,
) -> onnx.FunctionProto:
    """Stage 2 as standard ops -> keep_index [B, T - V + keep] (see `duet_export.stages.t2v.t2v_drop`)."""
    b = _Body()
    bsz, t, v = batch, length, visual_tokens
    text_rows = t - v
    # q/k weights come transposed ([in, out]), as the layer's own MatMuls hold them: one stored copy
    inputs = [
        "normed",
        "q_weight_t",
        "q_bias",
        "k_weight_t",
        "k_bias",
        "cos",
        "sin",
        "real",
        "visual",
        "query",
    ]
    text = b.op("Not", "visual")
    if keep == 0:
        b.nodes.append(helper.make_node("Identity", [b.compact(text, t, text_rows)], ["keep_index"]))
        return _function("T2VDrop", overload, inputs, ["keep_index"], b)
    index = b.op("Expand", b.const(np.arange(t, dtype=np.int64).reshape(1, t)), b.ints(bsz, t))
    minus_one = b.ints(-1)
    last_visual = b.op("ReduceMax", b.op("Where", "visual", index, minus_one), b.ints(1), keepdims=1)
    eligible = b.op("And", b.op("Greater", index, last_visual), "real")
    final = b.op("ReduceMax", b.op("Where", "real", index, minus_one), b.ints(1), keepdims=1)
    is_final = b.op("Equal", index, final)
    if query_mode == "all":
        chosen = b.op("Or", eligible, is_final)
    elif query_mode == "salient":
        chosen = b.op("Or", b.op("And", eligible, "query"), is_final)
    else:
        chosen = is_final
    text_index = b.compact(text, t, text_rows)
    visual_index = b.compact("visual", t, v)
    # queries: only the text rows
    x_text = b.gather_rows("normed", text_index, (bsz, text_rows, hidden))
    q = b.op("MatMul", x_text, "q_weight_t")
    if q_bias:
        q = b.op("Add", q, "q_bias")
    q = b.op("Transpose", b.op("Reshape", q, b.ints(bsz, text_rows, num_heads, head_dim)), perm=[0, 2, 1, 3])
    k = b.op("MatMul", "normed", "k_weight_t")
    if k_bias:
        k = b.op("Add", k, "k_bias")
    k = b.op("Transpose", b.op("Reshape", k, b.ints(bsz, t, num_kv_heads, head_dim)), perm=[0, 2, 1, 3])
    cos_q = b.unsqueeze(b.gather_rows("cos", text_index, (bsz, text_rows, head_dim)), 1)
    sin_q = b.unsqueeze(b.gather_rows("sin", text_index, (bsz, text_rows, head_dim)), 1)
    q = _rotate(b, q, cos_q, sin_q, head_dim // 2)
    k = _rotate(b, k, b.unsqueeze("cos", 1), b.unsqueeze("sin", 1), head_dim // 2)
    q, k = b.cast(q, onnx.TensorProto.FLOAT), b.cast(k, onnx.TensorProto.FLOAT)
    if num_heads != num_kv_heads:
        rep = num_heads // num_kv_heads
        k = b.op("Expand", b.unsqueeze(k, 2), b.ints(bsz, num_kv_heads, rep, t, head_dim))
        k = b.op("Reshape", k, b.ints(bsz, num_heads, t, head_dim))
    logits = b.op(
        "Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), b.const(np.float32(scale))
    )
    causal = b.op(
        "LessOrEqual", b.const(np.arange(t, dtype=np.int64).reshape(1, 1, t)), b.unsqueeze(text_index, 2)
    )  # [B, Q, T]
    allowed = b.op("And", causal, b.unsqueeze("real", 1))
    logits = b.op("Where", b.unsqueeze(allowed, 1), logits, b.const(np.float32(_FLOAT_MIN)))
    probs = b.op("ReduceMean", b.op("Softmax", logits, axis=-1), b.ints(1), keepdims=0)  # [B, Q, T]
    weights = b.cast(b.op("GatherElements", chosen, text_index, axis=1), onnx.TensorProto.FLOAT)  # [B, Q]
    vis_cols = b.op("Expand", b.unsqueeze(visual_index, 1), b.ints(bsz, text_rows, v))
    probs_v = b.op("GatherElements", probs, vis_cols, axis=2)  # [B, Q, V]
    total = b.op("ReduceSum", b.op("Mul", probs_v, b.unsqueeze(weights, 2)), b.ints(1), keepdims=0)
    count = b.op("Max", b.op("ReduceSum", weights, b.ints(1), keepdims=1), b.const(np.float32(1.0)))
    scores = b.op("Div", total, count)  # [B, V]
    kept = b.op("Less", b.rank(scores, v), b.ints(keep))  # [B, V], in block order
    block = b.op("Sub", b.op("CumSum", b.cast("visual", onnx.TensorProto.INT64), b.scalar(1)), b.ints(1))
    block = b.op("Clip", block, b.scalar(0), b.scalar(v - 1))
    kept_here = b.op("And", b.op("GatherElements", kept, block, axis=1), "visual")
    stays = b.op("Or", text, kept_here)
    b.nodes.append(helper.make_node("Identity", [b.compact(stays, t, text_rows + keep)], ["keep_index"]))
    return _function("T2VDrop", overload, inputs, ["keep_index"], b)


def _dims(value: ir.Value) -> tuple[int, ...]:
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        raise ValueError(
            f"{value.name} needs a static shape to build a duet function body, got {value.shape}"
        )
    return tuple(value.shape)


def _attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def attach_functions(model: ir.Model) -> int:
    """Give every `duet` node of `model` its own function body (overload `n<index>`); returns how many."""
    count = 0
    for i, node in enumerate(n for n in model.graph if n.domain == DOMAIN):
        overload = f"n{i}"
        a = _attrs(node)
        if node.op_type == "V2VMerge":
            n, tokens, hidden = _dims(node.inputs[0])
            proto = v2v_function(
                overload,
                batch=n,
                patches=tokens - 1,
                hidden=hidden,
                key_dim=_dims(node.inputs[2])[2],
                dominant=a["dominant"],
                contextual=a["contextual"],
                cluster_width=a["cluster_width"],
            )
        elif node.op_type == "T2VDrop":
            bsz, t, hidden = _dims(node.inputs[0])
            proto = t2v_function(
                overload,
                batch=bsz,
                length=t,
                hidden=hidden,
                num_heads=a["num_heads"],
                num_kv_heads=a["num_kv_heads"],
                head_dim=a["head_dim"],
                scale=a["scale"],
                visual_tokens=a["visual_tokens"],
                keep=a["keep"],
                query_mode=a["query_mode"],
                q_bias=node.inputs[2] is not None,
                k_bias=node.inputs[4] is not None,
            )
        else:
            raise ValueError(f"unknown duet op {node.op_type}")
        node.overload = overload
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
        count += 1
    model.opset_imports.setdefault(DOMAIN, 1)
    return count
