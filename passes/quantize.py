"""Weight-only quantization of the linear layers, with onnxruntime's own quantization tooling."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["QuantizeSettings", "QuantizeWeightsPass", "weight_digest"]

_ORT_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantizeSettings:
    """What `--weights` asks for. `format`: "nbits" (com.microsoft.MatMulNBits, block-wise, onnxruntime's
    CPU and CUDA providers) or "integer" (DynamicQuantizeLinear + MatMulInteger: standard ops at opset
    <= 19, which MIGraphX's table lists; 8 bits, per-tensor activations quantized at run time)."""

    bits: int
    block_size: int = 128
    symmetric: bool = False
    format: str = "nbits"


def weight_digest(array: np.ndarray) -> str:
    """Identity of a weight's contents (dtype, shape and bytes), to find a layer's MatMul by its weight."""
    a = np.ascontiguousarray(array)
    return hashlib.sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()


def _constant_weight(node: ir.Node) -> ir.Value | None:
    """The MatMul's B input when it is a 2-D initializer (a linear layer's weight), else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    b = node.inputs[1]
    if b is None or b.const_value is None or b.shape is None or len(b.shape) != 2:
        return None
    return b


class QuantizeWeightsPass(ir.passes.PassBase):
    """Quantize the weights of chosen linear layers (MatMul with a 2-D constant weight) to int4 or int8.

    Rules:
    1. The quantizer is onnxruntime's: `DefaultWeightOnlyQuantizer`, the node quantizer behind
       `MatMulNBitsQuantizer` (block-wise, `block_size`, symmetric or not), applied one weight at a time
       so that memory stays bounded, for the "nbits" format; `quantize_dynamic` (MatMulInteger, weights per
       channel) on the whole graph for "integer".
    2. Only MatMuls whose weight's contents are in `allowed` are quantized (`weight_digest` of the layer's
       weight or its transpose); `allowed=None` takes every linear layer of the graph. Activations keep the
       graph's float type.
    3. It never fires inside function bodies: run it before `lower`, and the `duet` stage nodes (and the
       q/k weights Stage 2 reads) are never quantized.
    4. A graph with no chosen MatMul is returned unchanged.
    """

    def __init__(self, settings: QuantizeSettings, allowed: Iterable[str] | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.allowed = None if allowed is None else set(allowed)
        self.quantized = 0

    @property
    def in_place(self) -> bool:
        """MatMulNBits replaces nodes in place; `quantize_dynamic` returns a new model."""
        return self.settings.format != "integer"

    @property
    def changes_input(self) -> bool:
        return self.in_place

    def _chosen(self, model: ir.Model) -> list[ir.Node]:
        chosen = []
        for node in model.graph:
            weight = _constant_weight(node)
            if weight is None:
                continue
            if self.allowed is None or weight_digest(weight.const_value.numpy()) in self.allowed:
                chosen.append(node)
        return chosen

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chosen = self._chosen(model)
        self.quantized = len(chosen)
        if not chosen:
            return ir.passes.PassResult(model, modified=False)
        # onnxruntime's quantizers log every node they skip at INFO; keep them quiet
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()):
            if self.settings.format == "integer":
                names = {n.name for n in chosen}
                proto = _integer(ir.serde.serialize_model(model), sorted(names))
                return ir.passes.PassResult(ir.serde.deserialize_model(proto), modified=True)
            quantizer = _nbits_quantizer(self.settings)
            for node in chosen:
                _quantize_node(model, node, quantizer)
        model.opset_imports.setdefault(_ORT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=True)


def _quantize_node(model: ir.Model, node: ir.Node, quantizer) -> None:
    """Replace one MatMul by onnxruntime's quantized node, one weight at a time: the quantizer sees a
    one-node graph holding only this weight, so a 7B model is never copied whole."""
    from onnx import helper

    weight = node.inputs[1]
    graph = helper.make_graph([], "one", [], [], initializer=[ir.serde.serialize_tensor(weight.const_value)])
    graph.initializer[0].name = weight.name
    proto = helper.make_node(
        "MatMul", [node.inputs[0].name, weight.name], [node.outputs[0].name], name=node.name
    )
    made = quantizer.quantize(proto, [graph])
    if len(made) != 1 or made[0].op_type == "MatMul":
        return  # the quantizer declined this weight (its rules): the layer stays float
    (new,) = made
    tensors = {t.name: t for t in graph.initializer if t.name != weight.name}
    inputs = []
    for name in new.input:
        if name == node.inputs[0].name:
            inputs.append(node.inputs[0])
        elif name in tensors:
            # copied out: a tensor read from the one-weight graph keeps that whole graph alive (the float
            # weight's serialized copy included), for every layer
            tensor = ir.Tensor(ir.serde.deserialize_tensor(tensors[name]).numpy().copy(), name=name)
            value = ir.Value(
                name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype)
            )
            model.graph.register_initializer(value)
            inputs.append(value)
        else:
            inputs.append(None)
    attributes = {a.name: helper.get_attribute_value(a) for a in new.attribute}
    replacement = ir.node(new.op_type, inputs, attributes=attributes, domain=new.domain, name=node.name)
    replacement.outputs[0].type = node.outputs[0].type
    replacement.outputs[0].shape = node.outputs[0].shape
    ir.convenience.replace_nodes_and_values(
        model.graph, node, [node], [replacement], [node.outputs[0]], [replacement.outputs[0]]
    )
    if not weight.uses():
        model.graph.initializers.pop(weight.name)


def _quantizer_module():
    """onnxruntime's MatMulNBits quantizer module, imported without the INFO-level root logging it sets up
    (`logging.basicConfig(level=INFO)` at import), which would print every library's INFO lines."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
    return matmul_nbits_quantizer


def _nbits_quantizer(settings: QuantizeSettings):
    """onnxruntime's per-node MatMulNBits quantizer (`DefaultWeightOnlyQuantizer`) for these settings."""
    q = _quantizer_module()
    config = q.DefaultWeightOnlyQuantConfig(
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        bits=settings.bits,
        op_types_to_quantize=("MatMul",),
    )
    return q.DefaultWeightOnlyQuantizer(config)


def _integer(proto, nodes: list[str]):
    import tempfile
    from pathlib import Path

    import onnx

    _quantizer_module()  # the package imports it too: keep its logging set-up out
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(proto, src)
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load(dst)
