"""Run ops that a float type is not defined for in float32 (bfloat16 Conv, for one)."""

from __future__ import annotations

import onnx
import onnx_ir as ir

__all__ = ["UpcastUnsupportedPass"]

_LOW = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)
_TYPE_NAMES = {ir.DataType.BFLOAT16: "tensor(bfloat16)", ir.DataType.FLOAT16: "tensor(float16)"}


def _allowed(schema: onnx.defs.OpSchema, formal: str) -> set[str] | None:
    """The type strings a formal input/output admits (None: unconstrained)."""
    for constraint in schema.type_constraints:
        if constraint.type_param_str == formal:
            return set(constraint.allowed_type_strs)
    return None


class UpcastUnsupportedPass(ir.passes.InPlacePass):
    """Wrap every node whose operator is not defined for its bfloat16/float16 inputs in Casts to float32.

    Rules:
    1. Only default-domain nodes of the graph (not function bodies) are looked at, against the operator's
       schema at the model's opset; a node whose low-precision inputs its type constraint admits is left
       alone (MatMul, Add, ... admit bfloat16 since opset 13).
    2. Each such input gets a Cast to float32 (a weight's cast folds into a float32 initializer in
       `cleanup`); each output of the same type parameter is cast back to the input's type, so the rest
       of the graph is unchanged.
    3. Does not fire on float32 graphs. In exported bundles it fires on bfloat16 vision graphs, whose patch
       embedding Conv (ONNX Conv has no bfloat16 type) then runs in float32.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", 1)
        modified = False
        for node in list(model.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                schema = onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                continue
            low = None
            for formal, value in zip(schema.inputs, node.inputs):
                if value is None or value.dtype not in _LOW:
                    continue
                allowed = _allowed(schema, formal.type_str)
                if allowed is not None and _TYPE_NAMES[value.dtype] not in allowed:
                    low = value.dtype, formal.type_str
                    break
            if low is None:
                continue
            self._upcast(model, node, schema, *low)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _upcast(model: ir.Model, node: ir.Node, schema, dtype: ir.DataType, type_str: str) -> None:
        graph = model.graph
        for i, (formal, value) in enumerate(zip(schema.inputs, node.inputs)):
            if value is None or formal.type_str != type_str:
                continue
            cast = ir.node("Cast", [value], attributes={"to": ir.DataType.FLOAT})
            cast.outputs[0].dtype = ir.DataType.FLOAT
            cast.outputs[0].shape = value.shape
            graph.insert_before(node, cast)
            node.replace_input_with(i, cast.outputs[0])
        for formal, out in zip(schema.outputs, node.outputs):
            if formal.type_str != type_str:
                continue
            uses = list(out.uses())
            back = ir.node("Cast", [out], attributes={"to": dtype})
            graph.insert_after(node, back)
            new = back.outputs[0]
            new.dtype, new.shape = dtype, out.shape
            for use in uses:
                use.node.replace_input_with(use.idx, new)
            if out in graph.outputs:
                graph.outputs[graph.outputs.index(out)] = new
                new.name, out.name = out.name, f"{out.name}_float32"
            out.dtype = ir.DataType.FLOAT
