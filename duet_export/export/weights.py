"""One weights file per bundle, each distinct tensor stored once.

The prefill and step graphs both carry the whole decoder (and the exporter names their initializers
differently), so saving each graph with its own external data stored every decoder weight twice. Here the
graphs are saved one after the other into a shared `weights.data`: every initializer of at least
`MIN_BYTES` is identified by its contents (SHA-256), written the first time it is seen and referenced by
offset every later time. Large tensors start at `ALIGNMENT`-byte offsets, so that onnxruntime can
memory-map them. Tensors are read and written one at a time: saving never holds a second copy of the
model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx_ir as ir

__all__ = ["ALIGNMENT", "WEIGHTS_FILE", "WeightStore"]

WEIGHTS_FILE = "weights.data"
ALIGNMENT = 1 << 16  # 64 KiB: the mmap granularity on every OS onnxruntime runs on
MIN_BYTES = 1024  # smaller tensors (shapes, scalars, tables) stay inside their graph


class WeightStore:
    """Append-only `weights.data` in `folder`, deduplicated by content."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / WEIGHTS_FILE
        self.seen: dict[str, tuple[int, int]] = {}  # digest -> (offset, length)
        self.size = 0
        self.written = 0  # bytes of tensor data written (without padding)
        self.referenced = 0  # bytes of tensor data the graphs reference (with repeats)

    def externalize(self, model: ir.Model) -> int:
        """Point every large initializer of `model` into the shared file; returns how many."""
        count = 0
        with open(self.path, "ab") as f:
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes < MIN_BYTES:
                    continue
                offset, length = self._add(f, tensor.tobytes())
                value.const_value = ir.ExternalTensor(
                    WEIGHTS_FILE,
                    offset,
                    length,
                    tensor.dtype,
                    shape=tensor.shape,
                    name=value.name,
                    base_dir=self.path.parent,
                )
                count += 1
        return count

    def _add(self, f, data: bytes) -> tuple[int, int]:
        self.referenced += len(data)
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.seen:
            return self.seen[digest]
        pad = (-self.size) % ALIGNMENT if len(data) >= ALIGNMENT else 0
        f.write(b"\0" * pad)
        offset = self.size + pad
        f.write(data)
        self.size = offset + len(data)
        self.written += len(data)
        self.seen[digest] = (offset, len(data))
        return offset, len(data)
