"""UpcastUnsupportedPass: ops not defined for bfloat16 run in float32, the rest of the graph unchanged."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from duet_export.passes.cleanup import CleanupPass
from duet_export.passes.upcast import UpcastUnsupportedPass


def _conv_model(dtype: int) -> ir.Model:
    """x -> Conv(w) -> Add(x') : Conv has no bfloat16 type in ONNX, Add does (opset 14+)."""
    np_type = ml_dtypes.bfloat16 if dtype == TensorProto.BFLOAT16 else np.float32
    w = np.ones((2, 1, 3, 3), dtype=np_type)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Add", ["c", "c"], ["y"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", dtype, [1, 1, 5, 5])],
        [helper.make_tensor_value_info("y", dtype, [1, 2, 3, 3])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def _strict_check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_a_bfloat16_conv_runs_in_float32_and_the_graph_becomes_valid():
    model = _conv_model(TensorProto.BFLOAT16)
    with pytest.raises(onnx.shape_inference.InferenceError, match="bfloat16"):
        _strict_check(model)
    assert UpcastUnsupportedPass()(model).modified
    CleanupPass()(model)  # folds the weight's cast into a float32 initializer
    _strict_check(model)
    ops = [(n.op_type, n.outputs[0].dtype) for n in model.graph]
    assert ops == [
        ("Cast", ir.DataType.FLOAT),
        ("Conv", ir.DataType.FLOAT),
        ("Cast", ir.DataType.BFLOAT16),
        ("Add", ir.DataType.BFLOAT16),  # admits bfloat16: left alone
    ]
    assert model.graph.outputs[0].dtype == ir.DataType.BFLOAT16


def test_float32_graphs_are_left_alone():
    model = _conv_model(TensorProto.FLOAT)
    assert not UpcastUnsupportedPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Conv", "Add"]
