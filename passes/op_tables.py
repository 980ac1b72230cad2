"""Supported-op tables per target, as data, each naming the document it was taken from.

The tables list default-domain (ai.onnx) operator names. They were transcribed from:

- MIGraphX: ROCm/AMDMIGraphX docs/dev/onnx_operators.rst@0a3b3851518167d5e98d39c73647385744e059b8 (the operator support table; ops marked not supported are left out, limitations
  that need constant inputs are in `MIGRAPHX_CONSTANT_INPUTS`).
- onnxruntime CUDA and CPU: microsoft/onnxruntime docs/OperatorKernels.md@001d12d2623fd411ce0f83d05abb5e82304a3389 (the CUDAExecutionProvider and CPUExecutionProvider ai.onnx
  kernel tables). onnxruntime also runs model-local functions, so the `duet` nodes run there through
  their bodies. Contrib-domain ops (`com.microsoft`) each provider runs are listed apart, from the same
  document's com.microsoft tables.

Refresh them when a provider moves: the `verify` pass and `duet-export check` read only these tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MIGRAPHX_CONSTANT_INPUTS", "TABLES", "OpTable"]


@dataclass(frozen=True)
class OpTable:
    name: str
    source: str
    max_opset: int
    static: bool  # the target compiles for fixed shapes: every dimension must be static
    keeps_duet_nodes: bool  # the runtime executes `duet` nodes through their function bodies
    ops: frozenset[str]
    constant_inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    contrib_ops: frozenset[str] = frozenset()  # "domain.Op" names outside ai.onnx the provider runs


_MIGRAPHX_SOURCE = "ROCm/AMDMIGraphX docs/dev/onnx_operators.rst@0a3b3851518167d5e98d39c73647385744e059b8"
_ORT_SOURCE = "microsoft/onnxruntime docs/OperatorKernels.md@001d12d2623fd411ce0f83d05abb5e82304a3389"

# fmt: off
_MIGRAPHX_OPS = frozenset((
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
    "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvInteger", "ConvTranspose", "Cos", "Cosh", "CumSum",
    "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "DynamicQuantizeLinear", "Einsum", "Elu",
    "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements",
    "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GridSample", "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax",
    "Identity", "If", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool",
    "MatMul", "MatMulInteger", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mod",
    "Mul", "Multinomial", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad",
    "Pow", "QLinearConv", "QLinearMatMul", "QuantizeLinear", "RNN", "RandomNormal", "RandomNormalLike",
    "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign", "Round", "Scan",
    "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin",
    "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu",
    "Unique", "Unsqueeze", "Upsample", "Where", "Xor"
))

_ORT_CUDA_OPS = frozenset((
    "Abs", "Add", "Affine", "And", "ArgMax", "ArgMin", "Attention", "AveragePool", "BatchNormalization",
    "Cast", "Ceil", "Clip", "Compress", "Concat", "ConcatFromSequence", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Crop", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout",
    "DynamicSlice", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor",
    "GRU", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool",
    "Greater", "GreaterOrEqual", "GridSample", "HardSigmoid", "HardSwish", "Identity", "If",
    "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "MatMul", "MatMulInteger", "Max",
    "MaxPool", "MemcpyFromHost", "MemcpyToHost", "Min", "Mod", "Mul", "Neg", "NonZero", "Not", "OneHot",
    "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow", "QuantizeLinear", "RMSNormalization", "RNN",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal",
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence",
    "RoiAlign", "RotaryEmbedding", "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements",
    "ScatterND", "Selu", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "Shape", "Shrink", "Sigmoid", "Sign",
    "SimplifiedLayerNormalization", "Sin", "Size", "Slice", "Softmax", "Softplus", "Softsign",
    "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "TensorScatter",
    "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor"
))

_ORT_CPU_OPS = frozenset((
    "Abs", "Acos", "Acosh", "Add", "Affine", "AffineGrid", "And", "ArgMax", "ArgMin", "Asin", "Asinh",
    "Atan", "Atanh", "Attention", "AveragePool", "BatchNormalization", "BitShift", "BitwiseAnd",
    "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow", "Cast", "Ceil", "Celu", "Clip", "Col2Im",
    "Compress", "Concat", "ConcatFromSequence", "ConstantOfShape", "Conv", "ConvInteger",
    "ConvTranspose", "Cos", "Cosh", "Crop", "CumSum", "DFT", "DepthToSpace", "DequantizeLinear", "Det",
    "Div", "Dropout", "DynamicQuantizeLinear", "DynamicSlice", "Einsum", "Elu", "Equal", "Erf", "Exp",
    "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements", "GatherND", "Gelu",
    "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GridSample", "HammingWindow", "HannWindow", "HardSigmoid", "Hardmax", "Identity", "If",
    "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool",
    "MatMul", "MatMulInteger", "Max", "MaxPool", "MaxRoiPool", "MaxUnpool", "Mean",
    "MeanVarianceNormalization", "MelWeightMatrix", "MemcpyFromHost", "MemcpyToHost", "Min", "Mod",
    "Mul", "Multinomial", "Neg", "NonZero", "Not", "OneHot", "Optional", "OptionalGetElement",
    "OptionalHasElement", "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow", "QLinearConv",
    "QLinearMatMul", "QuantizeLinear", "RMSNormalization", "RNN", "RandomNormal", "RandomNormalLike",
    "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "RegexFullMatch", "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign",
    "RotaryEmbedding", "Round", "STFT", "Scale", "ScaledTanh", "Scan", "Scatter", "ScatterElements",
    "ScatterND", "Selu", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "Shape", "Shrink", "Sigmoid", "Sign",
    "SimplifiedLayerNormalization", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign",
    "SpaceToDepth", "Split", "SplitToSequence", "Sqrt", "Squeeze", "StringConcat", "StringNormalizer",
    "StringSplit", "Sub", "Sum", "Tan", "Tanh", "TensorScatter", "TfIdfVectorizer", "ThresholdedRelu",
    "Tile", "TopK", "Transpose", "Trilu", "Unique", "Unsqueeze", "Upsample", "Where", "Xor"
))

# fmt: on

# com.microsoft ops a quantized bundle uses, in the CPUExecutionProvider and CUDAExecutionProvider
# com.microsoft kernel tables of the same OperatorKernels.md (MIGraphX's table lists none of them).
_ORT_CONTRIB_OPS = frozenset(("com.microsoft.MatMulNBits",))

# CUDA adds the op the `cuda` pipeline's fused attention writes (same table; MultiHeadAttention: float,
# float16, bfloat16).
_ORT_CUDA_FUSED_OPS = _ORT_CONTRIB_OPS | frozenset(("com.microsoft.MultiHeadAttention",))

# Inputs MIGraphX needs as constants ("dynamic shape is not supported" / "variable inputs not supported").
MIGRAPHX_CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "Slice": (1, 2, 3, 4),
    "Reshape": (1,),
    "Expand": (1,),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "TopK": (1,),
    "Tile": (1,),
    "Split": (1,),
    "Range": (0, 1, 2),
    "CumSum": (1,),
    "ConstantOfShape": (0,),
    "OneHot": (1,),
    "Pad": (1, 2),
    "Trilu": (1,),
    **{
        op: (1,)
        for op in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
        )
    },
}

TABLES: dict[str, OpTable] = {
    "cpu": OpTable(
        "onnxruntime CPU",
        _ORT_SOURCE,
        23,
        static=False,
        keeps_duet_nodes=True,
        ops=_ORT_CPU_OPS,
        contrib_ops=_ORT_CONTRIB_OPS,
    ),
    "cuda": OpTable(
        "onnxruntime CUDA",
        _ORT_SOURCE,
        23,
        static=True,
        keeps_duet_nodes=False,
        ops=_ORT_CUDA_OPS,
        contrib_ops=_ORT_CUDA_FUSED_OPS,
    ),
    "migraphx": OpTable(
        "MIGraphX",
        _MIGRAPHX_SOURCE,
        19,
        static=True,
        keeps_duet_nodes=False,
        ops=_MIGRAPHX_OPS,
        constant_inputs=MIGRAPHX_CONSTANT_INPUTS,
    ),
}
