"""Lower the `duet` custom nodes to standard ONNX ops."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass

from duet_export.stages.ops import DOMAIN

__all__ = ["LowerDuetOpsPass"]


class LowerDuetOpsPass(ir.passes.InPlacePass):
    """Replace each `duet.*` node by the standard ops of its function body.

    Rules:
    1. Every `duet` node must carry a function body (`attach_functions` at export); a node without one is an
       error, never silently kept.
    2. The body is inlined in place of the node: constant shapes, sorting-free ranks (ties to the lower
       index, as PyTorch), so the result is static-compiler friendly.
    3. The `duet` functions and opset import are removed afterwards.
    Does not fire on a model without `duet` nodes.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == DOMAIN]
        if not nodes:
            return ir.passes.PassResult(model, modified=False)
        for node in nodes:
            if (node.domain, node.op_type, node.overload) not in model.functions:
                raise ir.passes.PassError(
                    f"{node.domain}.{node.op_type} node {node.name!r} has no function body to lower"
                )
        InlinePass(criteria=lambda f: f.domain == DOMAIN)(model)
        for key in [k for k in model.functions if k[0] == DOMAIN]:
            del model.functions[key]
        model.opset_imports.pop(DOMAIN, None)
        return ir.passes.PassResult(model, modified=True)
