"""Small helpers for the passes' unit tests: build a one-node-at-a-time graph, run it on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

__all__ = ["make_model", "run_model"]


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    *,
    opset: int = 18,
    functions: list[onnx.FunctionProto] = (),
    extra_opsets: dict[str, int] | None = None,
) -> ir.Model:
    """An onnx-ir model from onnx.helper pieces (the way the tests of a pass describe a tiny graph)."""
    imports = [helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()
    ]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=imports, functions=list(functions), ir_version=10)
    return ir.serde.deserialize_model(proto)


def run_model(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an onnx-ir model on the CPU provider."""
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)
