"""Run a session through IOBinding with buffers that never move: what CUDA-graph replay requires.

A captured CUDA graph replays with the device addresses it was captured with, so every input and output
must live in one fixed buffer for the session's lifetime. Bundles make that possible: every shape is fixed.
The buffers are allocated on the first call; later calls copy new values into them in place.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

__all__ = ["BoundSession"]

_NUMPY_OF = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class BoundSession:
    """`run(feeds) -> {name: array}` over fixed device buffers (device "cuda" or "cpu")."""

    def __init__(self, session: ort.InferenceSession, device: str = "cuda", device_id: int = 0) -> None:
        self.session, self.device, self.device_id = session, device, device_id
        self.binding = session.io_binding()
        self.inputs: dict[str, ort.OrtValue] = {}
        self.outputs: dict[str, ort.OrtValue] = {}

    def _allocate(self, feeds: dict[str, np.ndarray]) -> None:
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)
            self.inputs[name] = value
            self.binding.bind_ortvalue_input(name, value)
        for out in self.session.get_outputs():
            if not all(isinstance(d, int) for d in out.shape):
                raise ValueError(
                    f"output {out.name} has a dynamic shape {out.shape}: cannot bind a fixed buffer"
                )
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                out.shape, _NUMPY_OF[out.type], self.device, self.device_id
            )
            self.outputs[out.name] = value
            self.binding.bind_ortvalue_output(out.name, value)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.inputs:
            self._allocate(feeds)
        else:
            for name, array in feeds.items():
                self.inputs[name].update_inplace(np.ascontiguousarray(array))
        self.session.run_with_iobinding(self.binding)
        # copies: on the CPU provider `numpy()` is a view of the buffer the next run overwrites
        return {name: np.array(value.numpy(), copy=True) for name, value in self.outputs.items()}
