"""The usual clean-up: constant folding, dead nodes, duplicate weights, unused functions and opsets."""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import (
    DeduplicateInitializersPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

__all__ = ["CleanupPass"]


class CleanupPass(ir.passes.InPlacePass):
    """Fold constants and remove what nothing uses.

    Rules:
    1. onnxscript's optimizer folds constant subgraphs and simplifies shapes, without inlining functions
       (so `duet` nodes and their bodies survive on targets that keep them).
    2. Nodes whose outputs nothing reads, functions no node calls and opset imports no node uses go.
    3. Initializers with identical contents are merged (the exporter copies the q/k weights Stage 2 reads).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        onnxscript.optimizer.optimize_ir(model, inline=False)
        for p in (
            RemoveUnusedNodesPass(),
            DeduplicateInitializersPass(),
            RemoveUnusedFunctionsPass(),
            RemoveUnusedOpsetsPass(),
        ):
            p(model)
        return ir.passes.PassResult(model, modified=True)
