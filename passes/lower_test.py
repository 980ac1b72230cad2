"""LowerDuetOpsPass: the lowered graph computes what the custom node computed, ties broken as PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

from duet_export.export.functions import attach_functions
from duet_export.passes.lower import LowerDuetOpsPass
from duet_export.passes.testing import make_model, run_model
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
