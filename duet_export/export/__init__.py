"""The ONNX compiler: export wrappers per graph, duet function bodies, bundles and their manifest."""
