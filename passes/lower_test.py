"""LowerDuetOpsPass: the lowered graph computes what the custom node computed, ties broken as PyTorch."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

from duet_export.export.functions import attach_functions
from duet_export.passes.lower import LowerDuetOpsPass
from duet_export.passes.testing import make_model, run_model
from duet_export.stages.t2v import t2v_drop
from duet_export.stages.v2v import v2v_merge

N, PATCHES, D, KD = 2, 12, 4, 3


def _v2v_model(dominant: int, contextual: int, width: int) -> ir.Model:
    node = helper.make_node(
        "V2VMerge",
        ["hidden", "cls_attention", "keys"],
        ["tokens", "dominant", "anchors"],
        domain="duet",
        dominant=dominant,
        contextual=contextual,
        cluster_width=width,
    )
    model = make_model(
        [node],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [N, PATCHES + 1, D]),
            helper.make_tensor_value_info("cls_attention", TensorProto.FLOAT, [N, PATCHES]),
            helper.make_tensor_value_info("keys", TensorProto.FLOAT, [N, PATCHES + 1, KD]),
        ],
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [N, dominant + contextual, D]),
            helper.make_tensor_value_info("dominant", TensorProto.INT64, [N, dominant - 1]),
            helper.make_tensor_value_info("anchors", TensorProto.INT64, [N, contextual]),
        ],
        extra_opsets={"duet": 1},
    )
    attach_functions(model)
    return model


def _inputs(seed: int, ties: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.random((N, PATCHES)).astype(np.float32)
    if ties:
        scores = np.round(scores * 3) / 3  # few distinct values: many ties
    return {
        "hidden": rng.standard_normal((N, PATCHES + 1, D)).astype(np.float32),
        "cls_attention": scores,
        "keys": rng.standard_normal((N, PATCHES + 1, KD)).astype(np.float32),
    }


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dominant, contextual, width", [(4, 2, 2), (5, 0, 4), (3, 3, 9)])
def test_lowered_v2v_equals_custom_node_and_pytorch(ties, dominant, contextual, width):
    feeds = _inputs(7, ties)
    custom = _v2v_model(dominant, contextual, width)
    with_node = run_model(custom, feeds)
    result = LowerDuetOpsPass()(custom)
    assert result.modified
    assert not [n for n in custom.graph if n.domain == "duet"] and not custom.functions
    assert "duet" not in custom.opset_imports
    lowered = run_model(custom, feeds)
    ref = v2v_merge(
        *(torch.from_numpy(feeds[k]) for k in ("hidden", "cls_attention", "keys")),
        dominant,
        contextual,
        width,
    )
    for got in (with_node, lowered):
        np.testing.assert_array_equal(got[1], ref.dominant.numpy())
        np.testing.assert_array_equal(got[2], ref.anchors.numpy())
        np.testing.assert_allclose(got[0], ref.tokens.numpy(), atol=1e-6)


# Stage 2. Small integer activations and weights, rotations by multiples of 90 degrees and a scale of 1000 make
# every logit an exact multiple of 1000: each query's softmax is then exactly 1/m on its m best keys and 0
# elsewhere (exp(-1000) is 0 in float32), so equal scores are equal in every implementation, and many
# visual tokens tie (at 0 and elsewhere).
B, T, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, SCALE = 2, 16, 6, 2, 1, 4, 1000.0
VISUAL = range(3, 13)  # 10 visual tokens; text before and after


def _t2v_inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    half = HEAD_DIM // 2
    turns = rng.integers(0, 4, (B, T, half))  # a quarter turn per rotary frequency
    cos = np.choose(turns, [1, 0, -1, 0]).astype(np.float32)
    sin = np.choose(turns, [0, 1, 0, -1]).astype(np.float32)
    visual = np.zeros((B, T), bool)
    visual[:, VISUAL] = True
    real = np.ones((B, T), bool)
    real[1, 0] = False  # sample 1 is left-padded by one token
    query = rng.random((B, T)) < 0.5
    query[:, 13] = True  # at least one salient word after the image
    return {
        "normed": rng.integers(-1, 2, (B, T, HIDDEN)).astype(np.float32),
        "q_weight": rng.integers(-1, 2, (HEADS * HEAD_DIM, HIDDEN)).astype(np.float32),
        "k_weight": rng.integers(-1, 2, (KV_HEADS * HEAD_DIM, HIDDEN)).astype(np.float32),
        "cos": np.concatenate([cos, cos], axis=-1),
        "sin": np.concatenate([sin, sin], axis=-1),
        "real": real,
        "visual": visual,
        "query": query & ~visual,
    }


def _exact_t2v_scores(feeds: dict[str, np.ndarray], b: int, mode: str) -> list[Fraction]:
    """Stage 2 scores of sample `b` in exact arithmetic, by loops over ALGORITHM.md's rules."""
    real, visual, query = (feeds[k][b].tolist() for k in ("real", "visual", "query"))
    x = feeds["normed"][b].astype(np.int64)
    cos, sin = feeds["cos"][b].astype(np.int64), feeds["sin"][b].astype(np.int64)

    def rotary(v: np.ndarray, t: int) -> np.ndarray:
        h = HEAD_DIM // 2
        return v * cos[t] + np.concatenate([-v[h:], v[:h]]) * sin[t]

    q = [[rotary(x[t] @ feeds["q_weight"][hd * HEAD_DIM : (hd + 1) * HEAD_DIM].T.astype(np.int64), t)
          for hd in range(HEADS)] for t in range(T)]  # fmt: skip
    k = [rotary(x[t] @ feeds["k_weight"].T.astype(np.int64), t) for t in range(T)]
    last_visual = max(t for t in range(T) if visual[t])
    final = max(t for t in range(T) if real[t])
    eligible = [t for t in range(last_visual + 1, T) if real[t]]
    chosen = {"all": eligible, "salient": [t for t in eligible if query[t]], "last": []}[mode]
    chosen = sorted(set(chosen) | {final})
    scores = []
    for v in (t for t in range(T) if visual[t]):
        total = Fraction(0)
        for i in chosen:
            for hd in range(HEADS):
                keys = [j for j in range(i + 1) if real[j]]
                logits = {j: int(q[i][hd] @ k[j]) for j in keys}
                best = [j for j in keys if logits[j] == max(logits.values())]
                total += Fraction(1, len(best)) if v in best else 0
        scores.append(total / (HEADS * len(chosen)))
    return scores


def _t2v_model(keep: int, mode: str) -> ir.Model:
    names = ["normed", "q_weight_t", "", "k_weight_t", "", "cos", "sin", "real", "visual", "query"]
    node = helper.make_node(
        "T2VDrop",
        names,
        ["keep_index"],
        domain="duet",
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        scale=SCALE,
        visual_tokens=len(VISUAL),
        keep=keep,
        query_mode=mode,
        layer=1,
    )
    shapes = {
        "normed": [B, T, HIDDEN],
        "q_weight_t": [HIDDEN, HEADS * HEAD_DIM],  # the node takes the projections transposed
        "k_weight_t": [HIDDEN, KV_HEADS * HEAD_DIM],
        "cos": [B, T, HEAD_DIM],
        "sin": [B, T, HEAD_DIM],
    }
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    inputs += [
        helper.make_tensor_value_info(n, TensorProto.BOOL, [B, T]) for n in ("real", "visual", "query")
    ]
    out = helper.make_tensor_value_info("keep_index", TensorProto.INT64, [B, T - len(VISUAL) + keep])
    model = make_model([node], inputs, [out], extra_opsets={"duet": 1})
    attach_functions(model)
    return model


@pytest.mark.parametrize("mode", ["salient", "all", "last"])
def test_t2v_ties_go_to_the_lower_index_in_custom_and_lowered_graphs(mode):
    feeds = _t2v_inputs(2)
    positions = list(VISUAL)
    text = [t for t in range(T) if t not in positions]
    scores = [_exact_t2v_scores(feeds, b, mode) for b in range(B)]

    def kept(b: int, keep: int, lower_first: bool) -> list[int]:
        order = sorted(range(len(positions)), key=lambda j: (-scores[b][j], j if lower_first else -j))
        return sorted(text + [positions[j] for j in order[:keep]])

    # the budgets at which breaking a tie the other way would keep other tokens, in some sample
    tied = [
        k for k in range(1, len(positions)) if any(kept(b, k, True) != kept(b, k, False) for b in range(B))
    ]
    assert len(tied) >= 3, f"the test data must tie at the cut ({mode}: {tied})"
    torch_inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    graph_feeds = {k: v for k, v in feeds.items() if not k.endswith("_weight")}
    graph_feeds.update(q_weight_t=feeds["q_weight"].T.copy(), k_weight_t=feeds["k_weight"].T.copy())
    for keep in tied:
        expected = np.array([kept(b, keep, True) for b in range(B)])
        model = _t2v_model(keep, mode)
        with_node = run_model(model, graph_feeds)[0]
        LowerDuetOpsPass()(model)
        assert not [n for n in model.graph if n.domain == "duet"]
        lowered = run_model(model, graph_feeds)[0]
        pytorch = t2v_drop(
            torch_inputs["normed"], torch_inputs["q_weight"], None, torch_inputs["k_weight"], None,
            torch_inputs["cos"], torch_inputs["sin"], torch_inputs["real"], torch_inputs["visual"],
            torch_inputs["query"], num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, scale=SCALE,
            visual_tokens=len(positions), keep=keep, mode=mode,
        )  # fmt: skip
        for name, got in (("custom node", with_node), ("lowered", lowered), ("pytorch", pytorch.numpy())):
            np.testing.assert_array_equal(got, expected, err_msg=f"{name}, keep {keep}, query={mode}")


def test_node_without_body_is_an_error():
    model = _v2v_model(4, 2, 2)
    model.functions.clear()
    with pytest.raises(ir.passes.PassError, match="no function body"):
        LowerDuetOpsPass()(model)


def test_model_without_duet_nodes_is_left_alone():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    assert not LowerDuetOpsPass()(model).modified
    assert onnx.checker.check_model(ir.serde.serialize_model(model)) is None
