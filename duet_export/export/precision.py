"""A bundle's precision: the float type its graphs compute in, and how its linear layers' weights are stored.

- dtype (`--dtype`): float32, float16 or bfloat16. The checkpoint is loaded in it (never as a float32 copy
  first) and every graph computes in it, except Stage 1's and Stage 2's scores (softmax of the CLS row and
  of the query rows, and the ranks), which run in float32 whatever the dtype. Default: float32 for `cpu`
  (onnxruntime's CPU provider computes float16 largely through inserted casts), float16 for `cuda` and
  `migraphx`.
- weights (`--weights`): "float" (as the dtype), "int8" or "int4", weight-only, for the decoder's and the
  projector's linear layers (and the vision tower's with `--quantize-vision`), by onnxruntime's own
  quantizers. On `cpu` and `cuda`: `com.microsoft.MatMulNBits`, block-wise (`--block-size`, `--symmetric`).
  On `migraphx`, whose table (opset <= 19) has no 4-bit type and no MatMulNBits: int8 only, as
  DynamicQuantizeLinear + MatMulInteger (weights per channel, activations per tensor at run time), with
  float32 activations, which DynamicQuantizeLinear requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duet_export.errors import DuetError
from duet_export.passes.quantize import QuantizeSettings, weight_digest

__all__ = ["DTYPES", "WEIGHTS", "Precision", "default_dtype", "dtype_name", "weight_digests"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHTS = ("float", "int8", "int4")


def default_dtype(target: str) -> str:
    return "float32" if target == "cpu" else "float16"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Precision:
    """How the linear layers' weights are stored (the dtype is the loaded model's)."""

    weights: str = "float"
    block_size: int = 128
    symmetric: bool = False
    quantize_vision: bool = False

    def validate(self, target: str, dtype: str) -> Precision:
        if self.weights not in WEIGHTS:
            raise DuetError(f"unknown --weights {self.weights!r} (choose from {', '.join(WEIGHTS)})")
        if dtype not in DTYPES:
            raise DuetError(f"unknown --dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        if self.weights == "float":
            if self.quantize_vision:
                raise DuetError("--quantize-vision needs --weights int8 or int4")
            return self
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise DuetError(f"--block-size must be a power of two of at least 16, got {self.block_size}")
        if target == "migraphx":
            if self.weights == "int4":
                raise DuetError(
                    "--weights int4 is not available for --target migraphx: MIGraphX's operator table "
                    "(opset <= 19) has no 4-bit type and no MatMulNBits; use --weights int8"
                )
            if dtype != "float32":
                raise DuetError(
                    "--weights int8 for --target migraphx needs --dtype float32: its int8 path "
                    "(DynamicQuantizeLinear + MatMulInteger) quantizes float32 activations only"
                )
        if dtype == "bfloat16":
            raise DuetError("--weights int8/int4 take float32 or float16 activations, not bfloat16")
        return self

    def quantize(self, target: str) -> QuantizeSettings | None:
        """The quantize pass's settings for `target`, or None for float weights."""
        if self.weights == "float":
            return None
        bits = 4 if self.weights == "int4" else 8
        fmt = "integer" if target == "migraphx" else "nbits"
        return QuantizeSettings(bits, self.block_size, self.symmetric, fmt)


def weight_digests(parameters: list[torch.nn.Parameter]) -> frozenset[str]:
    """Digests of these 2-D weights and of their transposes (a linear layer's MatMul holds W^T)."""
    out = set()
    for p in parameters:
        if p.dim() != 2:
            continue
        if p.dtype == torch.bfloat16:  # never quantized (see Precision.validate); numpy has no bfloat16
            continue
        array = p.detach().cpu().numpy()
        out.add(weight_digest(array))
        out.add(weight_digest(array.T))
    return frozenset(out)
