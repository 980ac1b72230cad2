"""Pipelines: which passes a target gets, in order. A pipeline is data; `run_pipeline` applies it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from duet_export.passes.cleanup import CleanupPass
from duet_export.passes.fix_shapes import FixShapesPass
from duet_export.passes.fuse_attention import FuseAttentionPass
from duet_export.passes.lower import LowerDuetOpsPass
from duet_export.passes.quantize import QuantizeSettings, QuantizeWeightsPass
from duet_export.passes.upcast import UpcastUnsupportedPass
from duet_export.passes.verify import VerifyPass, VerifyReport

__all__ = ["PASSES", "PIPELINES", "TARGETS", "PassContext", "PassInfo", "run_pipeline"]

TARGETS = ("cpu", "cuda", "migraphx")


@dataclass(frozen=True)
class PassContext:
    """What a pass may need to know about the graph it runs on."""

    target: str
    graph: str = "model"
    quantize: QuantizeSettings | None = None  # --weights int4|int8; None: keep the float weights
    quantize_weights: frozenset[str] | None = None  # digests of the weights to quantize (None: all)


@dataclass(frozen=True)
class PassInfo:
    name: str
    cls: type[ir.passes.PassBase]
    make: Callable[[PassContext], ir.passes.PassBase]

    @property
    def summary(self) -> str:
        return (self.cls.__doc__ or "").strip().splitlines()[0]


PASSES: dict[str, PassInfo] = {
    "quantize": PassInfo(
        "quantize", QuantizeWeightsPass, lambda c: QuantizeWeightsPass(c.quantize, c.quantize_weights)
    ),
    "lower": PassInfo("lower", LowerDuetOpsPass, lambda c: LowerDuetOpsPass()),
    "fix-shapes": PassInfo("fix-shapes", FixShapesPass, lambda c: FixShapesPass()),
    "upcast": PassInfo("upcast", UpcastUnsupportedPass, lambda c: UpcastUnsupportedPass()),
    "cleanup": PassInfo("cleanup", CleanupPass, lambda c: CleanupPass()),
    "fuse-attention": PassInfo("fuse-attention", FuseAttentionPass, lambda c: FuseAttentionPass()),
    "verify": PassInfo("verify", VerifyPass, lambda c: VerifyPass(c.target, c.graph)),
}

PIPELINES: dict[str, tuple[str, ...]] = {
    # onnxruntime runs the duet nodes through their function bodies: keep them, readable and inspectable.
    "cpu": ("upcast", "cleanup", "verify"),
    # static compilers (CUDA graphs, MIGraphX) get standard ops and static shapes; CUDA also gets fused
    # attention (onnxruntime's MultiHeadAttention kernels), whose mask shape the second cleanup folds.
    # The CPU provider keeps plain attention: MultiHeadAttention measured no faster there (docs/bench.md).
    "cuda": ("lower", "fix-shapes", "upcast", "cleanup", "fuse-attention", "cleanup", "verify"),
    "migraphx": ("lower", "fix-shapes", "upcast", "cleanup", "verify"),
}


def pipeline_of(context: PassContext) -> tuple[str, ...]:
    """The passes a graph gets: its target's pipeline, after `quantize` when weights are quantized (the
    stage nodes are still whole then, so they are never quantized)."""
    return (("quantize",) if context.quantize else ()) + PIPELINES[context.target]


def run_pipeline(
    model: ir.Model, context: PassContext, save: Callable[[ir.Model], str] | None = None
) -> tuple[ir.Model, list[str], list[VerifyReport]]:
    """Apply the pipeline; returns the resulting model, the pass names applied and the verify reports.

    `save(model) -> path`, when given, writes the model before `verify`, which then runs the ONNX checker
    on that file: a checker in memory would serialize a second copy of every weight.
    """
    names = pipeline_of(context)
    reports = []
    for name in names:
        if name == "verify":
            p = VerifyPass(context.target, context.graph, path=save(model) if save is not None else None)
            reports.append(p.report)
        else:
            p = PASSES[name].make(context)
        model = p(model).model
    return model, list(names), reports
