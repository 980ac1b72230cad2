"""CleanupPass: constants fold, dead nodes go, the outputs stay the same."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from duet_export.passes.cleanup import CleanupPass
from duet_export.passes.testing import make_model, run_model


def test_folds_constants_and_removes_dead_nodes():
    two = helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2.0)))
    three = helper.make_node("Constant", [], ["three"], value=numpy_helper.from_array(np.float32(3.0)))
    nodes = [
        two,
        three,
        helper.make_node("Mul", ["two", "three"], ["six"]),  # constant subgraph
        helper.make_node("Mul", ["x", "six"], ["y"]),
        helper.make_node("Exp", ["x"], ["unused"]),  # dead
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    model = make_model(nodes, [x], [y])
    feeds = {"x": np.array([1.0, -2.0, 0.5], np.float32)}
    before = run_model(model, feeds)[0]
    CleanupPass()(model)
    ops = [n.op_type for n in model.graph]
    assert "Exp" not in ops and ops.count("Mul") == 1
    np.testing.assert_allclose(run_model(model, feeds)[0], before)
