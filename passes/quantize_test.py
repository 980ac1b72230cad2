"""QuantizeWeightsPass: only the chosen linear layers are quantized, by onnxruntime's own quantizers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from duet_export.passes.quantize import QuantizeSettings, QuantizeWeightsPass, weight_digest
from duet_export.passes.testing import run_model
from duet_export.passes.verify import VerifyPass

K, N = 64, 32
RNG = np.random.default_rng(0)
W1 = (RNG.standard_normal((K, N)) * 0.05).astype(np.float32)
W2 = (RNG.standard_normal((N, N)) * 0.05).astype(np.float32)


def _model() -> ir.Model:
    """x -> MatMul(w1) -> MatMul(w2) = y, and y @ y^T: two linear layers and a product of activations."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="second"),
            helper.make_node("Transpose", ["y"], ["yt"], perm=[1, 0]),
            helper.make_node("MatMul", ["y", "yt"], ["gram"], name="activations"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, N]),
            helper.make_tensor_value_info("gram", TensorProto.FLOAT, [4, 4]),
        ],
        initializer=[numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def _ops(model: ir.Model) -> list[str]:
    return [f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph]


@pytest.mark.parametrize("bits,tolerance", [(8, 2e-3), (4, 3e-2)])
def test_only_the_chosen_layer_becomes_matmulnbits_and_stays_close(bits, tolerance):
    x = RNG.standard_normal((4, K)).astype(np.float32)
    reference = run_model(_model(), {"x": x})[0]
    p = QuantizeWeightsPass(QuantizeSettings(bits, block_size=32), allowed={weight_digest(W1)})
    out = p(_model()).model
    assert p.quantized == 1
    assert _ops(out).count("com.microsoft.MatMulNBits") == 1 and _ops(out).count("MatMul") == 2
    y = run_model(out, {"x": x})[0]
    assert not np.array_equal(y, reference)  # the weights did change ...
    np.testing.assert_allclose(y, reference, atol=tolerance)  # ... by quantization error only
    verify = VerifyPass("cpu")
    verify(out)
    assert verify.report.ok, verify.report.format()
    mig = VerifyPass("migraphx")
    mig(out)
    assert not mig.report.ok and "com.microsoft.MatMulNBits" in mig.report.format()


def test_all_linear_layers_and_never_an_activation_product():
    p = QuantizeWeightsPass(QuantizeSettings(4, block_size=32))
    out = p(_model()).model
    assert p.quantized == 2 and _ops(out).count("MatMul") == 1  # the Gram product stays


def test_integer_format_uses_standard_ops_migraphx_lists():
    x = RNG.standard_normal((4, K)).astype(np.float32)
    reference = run_model(_model(), {"x": x})[0]
    out = QuantizeWeightsPass(QuantizeSettings(8, format="integer")).call(_model()).model
    assert _ops(out).count("MatMulInteger") == 2 and "com.microsoft.MatMulNBits" not in _ops(out)
    np.testing.assert_allclose(run_model(out, {"x": x})[0], reference, atol=5e-3)
    verify = VerifyPass("migraphx")
    verify(out)
    assert [f.rule for f in verify.report.findings if not f.ok] == [], verify.report.format()


def test_nothing_chosen_leaves_the_graph_alone():
    model = _model()
    result = QuantizeWeightsPass(QuantizeSettings(4), allowed=set()).call(model)
    assert not result.modified and result.model is model
