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


class QuantizeWeightsPass(ir.passes.FunctionalPass):
    """Quantize the weights of chosen linear layers (MatMul with a 2-D constant weight) to int4 or int8.

    Rules:
    1. The quantizer is onnxruntime's: `MatMulNBitsQuantizer` (block-wise, `block_size`, symmetric or not)
       for the "nbits" format, `quantize_dynamic` (MatMulInteger, weights per channel) for "integer".
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
        names = {n.name for n in chosen}
        others = [n.name for n in model.graph if n.op_type == "MatMul" and n.name not in names]
        proto = ir.serde.serialize_model(model)
        # onnxruntime's quantizers log every node they skip at INFO; keep them quiet
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()):
            if self.settings.format == "integer":
                proto = _integer(proto, sorted(names))
            else:
                proto = _nbits(proto, self.settings, others)
        out = ir.serde.deserialize_model(proto)
        return ir.passes.PassResult(out, modified=True)


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


def _nbits(proto, settings: QuantizeSettings, exclude: list[str]):
    q = _quantizer_module()
    config = q.DefaultWeightOnlyQuantConfig(
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        bits=settings.bits,
        op_types_to_quantize=("MatMul",),
    )
    quantizer = q.MatMulNBitsQuantizer(proto, nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    return quantizer.model.model


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
