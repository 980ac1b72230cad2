"""onnxruntime side: provider selection, sessions, and the generation loop over per-group KV caches."""
