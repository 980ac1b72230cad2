"""FixShapesPass: symbolic input dimensions become the given integers, and shapes propagate."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from duet_export.passes.fix_shapes import FixShapesPass
from duet_export.passes.testing import make_model


def _model() -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], [x], [y]
    )


def test_symbolic_dims_become_static_and_propagate():
    model = _model()
    assert FixShapesPass({"batch": 3})(model).modified
    assert list(model.graph.inputs[0].shape) == [3, 4]
    assert list(model.graph.outputs[0].shape) == [3, 4]
    assert all(list(o.shape) == [3, 4] for n in model.graph for o in n.outputs)


def test_missing_value_is_an_error_naming_the_dim():
    with pytest.raises(ir.passes.PassError, match="'batch'"):
        FixShapesPass({})(_model())


def test_static_model_is_unchanged():
    model = _model()
    FixShapesPass({"batch": 2})(model)
    assert not FixShapesPass()(model).modified
