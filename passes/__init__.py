"""ONNX graph passes on onnx-ir: lowering of the duet custom ops, static shapes, verification, clean-up."""
