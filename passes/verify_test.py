"""VerifyPass: each rule fails on the graph that breaks it and passes on a clean one."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from duet_export.passes.op_tables import TABLES
from duet_export.passes.testing import make_model
from duet_export.passes.verify import VerifyPass


def _verify(model, target):
    p = VerifyPass(target, "g")
    p(model)
    return {f.rule: f for f in p.report.findings}, p.report


def _relu(shape=(2, 3), opset=18):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=opset)


@pytest.mark.parametrize("target", ["cpu", "cuda", "migraphx"])
def test_clean_static_graph_passes_everywhere(target):
    _findings, report = _verify(_relu(), target)
    assert report.ok, report.format()
    assert "passes verify" in report.format()


def test_opset_above_19_fails_for_migraphx_only():
    model = _relu(opset=21)
    assert not _verify(model, "migraphx")[0]["opset"].ok
    assert _verify(_relu(opset=21), "cpu")[0]["opset"].ok


def test_dynamic_dims_fail_static_targets_only():
    assert not _verify(_relu(shape=("batch", 3)), "migraphx")[0]["static"].ok
    assert not _verify(_relu(shape=("batch", 3)), "cuda")[0]["static"].ok
    assert "static" not in _verify(_relu(shape=("batch", 3)), "cpu")[0]


def test_unsupported_op_is_named():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = make_model([helper.make_node("Compress", ["x", "c"], ["y"], axis=0)], [x, c], [y])
    findings, report = _verify(model, "migraphx")
    assert not findings["ops"].ok and "Compress x1" in findings["ops"].message
    assert not findings["constants"].ok and "data-dependent" in findings["constants"].message
    assert "FAIL" in report.format()
    assert "Compress" in TABLES["cpu"].ops


def test_non_constant_shape_input_fails_migraphx():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])
    model = make_model([helper.make_node("Reshape", ["x", "s"], ["y"])], [x, s], [y])
    assert not _verify(model, "migraphx")[0]["constants"].ok
    shape = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([3, 2], np.int64)))
    fixed = make_model([shape, helper.make_node("Reshape", ["x", "k"], ["y"])], [x], [y])
    assert _verify(fixed, "migraphx")[0]["constants"].ok


def test_duet_node_accepted_only_where_kept_with_a_body():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("Mystery", ["x"], ["y"], domain="duet")
    model = make_model([node], [x], [y], extra_opsets={"duet": 1})
    findings, _ = _verify(model, "cpu")
    assert not findings["ops"].ok and "no function body" in findings["ops"].message


def test_tables_name_their_source():
    for table in TABLES.values():
        assert "onnx_operators.rst" in table.source or "OperatorKernels.md" in table.source
    assert TABLES["migraphx"].max_opset == 19 and "Compress" not in TABLES["migraphx"].ops
