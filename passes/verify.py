"""Verify that a graph can run on a target: ONNX checker, static shapes, opset and the supported-op table."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from duet_export.passes.op_tables import TABLES, OpTable
from duet_export.stages.ops import DOMAIN

__all__ = ["Finding", "VerifyPass", "VerifyReport", "weight_bytes"]

# Ops whose output size depends on the data: no static compiler can give them a fixed shape.
_DATA_DEPENDENT = ("NonZero", "Compress", "Unique")
_CHECKER_LIMIT = 1 << 31  # protobuf cannot serialise a model above 2 GiB in memory


@dataclass
class Finding:
    ok: bool
    rule: str
    message: str


@dataclass
class VerifyReport:
    target: str
    graph: str = "model"
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def add(self, ok: bool, rule: str, message: str) -> None:
        self.findings.append(Finding(ok, rule, message))

    def format(self) -> str:
        lines = [f"{self.graph}: {'passes' if self.ok else 'FAILS'} verify for {self.target}"]
        lines += [f"  {'ok  ' if f.ok else 'FAIL'} {f.rule:<10} {f.message}" for f in self.findings]
        return "\n".join(lines)


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by the graph's initializers (what decides external data and in-memory checking)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain == ""


def _static(shape: ir.Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


class VerifyPass(ir.passes.InPlacePass):
    """Check a graph against a target: checker, opset, static shapes, supported ops, constant inputs.

    The findings are in `self.report`; the model is not changed.

    Rules:
    1. checker: the ONNX checker accepts the model (skipped above 2 GiB in memory; `check` runs it on files).
    2. opset: the default-domain opset is at most the target's maximum (19 for MIGraphX).
    3. static: on a static target, every graph input, output and inferred intermediate shape is static.
    4. ops: every node is in the target's supported-op table (`op_tables.py`, which names its source), or
       among its contrib-domain ops (onnxruntime's `com.microsoft.MatMulNBits` for quantized weights, and
       CUDA's `com.microsoft.MultiHeadAttention` for fused attention);
       `duet` nodes are accepted only where the target keeps them (onnxruntime runs their function bodies).
    5. constants: on a static target no op has a data-dependent output size (NonZero, Compress, Unique),
       and the inputs the table needs as constants (MIGraphX: Slice starts, Reshape shape, TopK k, ...) are.
    """

    def __init__(self, target: str, graph_name: str = "model", path: str | None = None) -> None:
        """`path`: the file the model was loaded from, where its external data lies (`check`)."""
        super().__init__()
        if target not in TABLES:
            raise ValueError(f"unknown target {target!r}")
        self.table: OpTable = TABLES[target]
        self.report = VerifyReport(target=target, graph=graph_name)
        self.path = path

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        table, report = self.table, self.report
        self._checker(model)
        opset = model.opset_imports.get("", 0)
        report.add(
            opset <= table.max_opset, "opset", f"default opset {opset} (target allows <= {table.max_opset})"
        )
        nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        if table.static:
            dynamic = [v.name for v in [*model.graph.inputs, *model.graph.outputs] if not _static(v.shape)]
            inner = [o.name for n in nodes for o in n.outputs if o.shape is not None and not _static(o.shape)]
            report.add(not dynamic and not inner, "static", self._static_message(dynamic, inner))
        unsupported: dict[str, int] = {}
        for node in nodes:
            if node.domain == DOMAIN:
                has_body = (node.domain, node.op_type, node.overload) in model.functions
                if not (table.keeps_duet_nodes and has_body):
                    why = (
                        " (no function body)"
                        if not has_body
                        else " (lower it: export with --target cuda/migraphx)"
                    )
                    key = f"{DOMAIN}.{node.op_type}{why}"
                    unsupported[key] = unsupported.get(key, 0) + 1
            elif node.domain not in ("", "ai.onnx"):
                if f"{node.domain}.{node.op_type}" not in table.contrib_ops:
                    key = f"{node.domain}.{node.op_type}"
                    unsupported[key] = unsupported.get(key, 0) + 1
            elif node.op_type not in table.ops:
                key = f"{node.domain + '.' if node.domain else ''}{node.op_type}"
                unsupported[key] = unsupported.get(key, 0) + 1
        used = sorted({n.op_type for n in nodes if n.domain in ("", "ai.onnx")})
        if unsupported:
            listed = ", ".join(f"{k} x{v}" for k, v in sorted(unsupported.items()))
            report.add(False, "ops", f"not supported by {table.name}: {listed}")
        else:
            report.add(True, "ops", f"all {len(used)} op types supported by {table.name} ({table.source})")
        if table.static:
            self._constant_inputs(nodes)
        return ir.passes.PassResult(model, modified=False)

    @staticmethod
    def _static_message(dynamic: list[str], inner: list[str]) -> str:
        if not dynamic and not inner:
            return "every input, output and inferred shape is static"
        parts = []
        if dynamic:
            parts.append(f"dynamic graph inputs/outputs: {', '.join(dynamic[:5])}")
        if inner:
            parts.append(f"{len(inner)} intermediate values with dynamic shapes (e.g. {inner[0]})")
        return "; ".join(parts)

    def _checker(self, model: ir.Model) -> None:
        if self.path is not None:  # on the file: external data resolves beside it, any size
            try:
                onnx.checker.check_model(self.path, full_check=True)
                self.report.add(True, "checker", "ONNX checker passes (with strict type inference)")
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                self.report.add(False, "checker", str(e).strip().splitlines()[0])
            return
        size = weight_bytes(model)
        if size >= _CHECKER_LIMIT:
            self.report.add(
                True,
                "checker",
                "skipped in memory (model above 2 GiB); `duet-export check` runs it on the file",
            )
            return
        try:
            # full_check: strict type and shape inference too (a bfloat16 Conv passes the plain checker)
            onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
            self.report.add(True, "checker", "ONNX checker passes (with strict type inference)")
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            self.report.add(False, "checker", str(e).strip().splitlines()[0])

    def _constant_inputs(self, nodes: list[ir.Node]) -> None:
        bad = []
        for node in nodes:
            if node.op_type in _DATA_DEPENDENT:
                bad.append(f"{node.op_type} has a data-dependent output size")
            for i in self.table.constant_inputs.get(node.op_type, ()):
                if i < len(node.inputs) and not _is_constant(node.inputs[i]):
                    bad.append(f"{node.op_type} {node.name!r} input {i} is not a constant")
        self.report.add(
            not bad,
            "constants",
            "; ".join(bad[:5]) if bad else "shape inputs are constants, no data-dependent sizes",
        )
