"""Make every dimension of a graph static."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

__all__ = ["FixShapesPass"]


class FixShapesPass(ir.passes.InPlacePass):
    """Give every graph input a static shape and propagate it.

    Rules:
    1. A symbolic input dimension (a name such as "batch") is replaced by `dims[name]`.
    2. A symbolic dimension with no value in `dims`, or an input without a shape, is an error naming it.
    3. Shape inference then runs so intermediate values and outputs carry static shapes too.
    Inputs whose dimensions are all integers are left as they are.
    """

    def __init__(self, dims: dict[str, int] | None = None) -> None:
        super().__init__()
        self.dims = dict(dims or {})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for value in model.graph.inputs:
            if value.shape is None:
                raise ir.passes.PassError(f"input {value.name!r} has no shape")
            new = []
            for dim in value.shape:
                if isinstance(dim, int):
                    new.append(dim)
                    continue
                name = str(dim.value) if isinstance(dim, ir.SymbolicDim) else str(dim)
                if name not in self.dims:
                    raise ir.passes.PassError(
                        f"input {value.name!r} has a symbolic dimension {name!r} and no value for it"
                    )
                new.append(self.dims[name])
                modified = True
            value.shape = ir.Shape(new)
        ShapeInferencePass()(model)
        return ir.passes.PassResult(model, modified=modified)
