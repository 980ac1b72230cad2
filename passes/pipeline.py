"""Pipelines: which passes a target gets, in order. A pipeline is data; `run_pipeline` applies it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from duet_export.passes.cleanup import CleanupPass
from duet_export.passes.fix_shapes import FixShapesPass
from duet_export.passes.fuse_attention import FuseAttentionPass
from duet_export.passes.lower import LowerDuetOpsPass
from duet_export.passes.verify import VerifyPass, VerifyReport

__all__ = ["PASSES", "PIPELINES", "TARGETS", "PassInfo", "run_pipeline"]

TARGETS = ("cpu", "cuda", "migraphx")


@dataclass(frozen=True)
class PassInfo:
    name: str
    cls: type[ir.passes.PassBase]
    make: Callable[[str, str], ir.passes.PassBase]

    @property
    def summary(self) -> str:
        return (self.cls.__doc__ or "").strip().splitlines()[0]


PASSES: dict[str, PassInfo] = {
    "lower": PassInfo("lower", LowerDuetOpsPass, lambda target, graph: LowerDuetOpsPass()),
    "fix-shapes": PassInfo("fix-shapes", FixShapesPass, lambda target, graph: FixShapesPass()),
    "cleanup": PassInfo("cleanup", CleanupPass, lambda target, graph: CleanupPass()),
    "fuse-attention": PassInfo(
        "fuse-attention", FuseAttentionPass, lambda target, graph: FuseAttentionPass()
    ),
    "verify": PassInfo("verify", VerifyPass, lambda target, graph: VerifyPass(target, graph)),
}

PIPELINES: dict[str, tuple[str, ...]] = {
    # onnxruntime runs the duet nodes through their function bodies: keep them, readable and inspectable.
    "cpu": ("cleanup", "verify"),
    # static compilers (CUDA graphs, MIGraphX) get standard ops and static shapes; CUDA also gets fused
    # attention (onnxruntime's MultiHeadAttention kernels), whose mask shape the second cleanup folds.
    # The CPU provider keeps plain attention: MultiHeadAttention measured no faster there (docs/bench.md).
    "cuda": ("lower", "fix-shapes", "cleanup", "fuse-attention", "cleanup", "verify"),
    "migraphx": ("lower", "fix-shapes", "cleanup", "verify"),
}


def run_pipeline(
    model: ir.Model, target: str, graph_name: str = "model"
) -> tuple[list[str], list[VerifyReport]]:
    """Apply the target's pipeline in place; returns the pass names applied and the verify reports."""
    passes = [PASSES[name].make(target, graph_name) for name in PIPELINES[target]]
    ir.passes.Sequential(*passes)(model)
    reports = [p.report for p in passes if isinstance(p, VerifyPass)]
    return list(PIPELINES[target]), reports
