"""The K/V cache in the provider's memory: on a GPU it never crosses to the host between decode steps.

The host-side loop (`OnnxVLM` with numpy buffers) feeds the step graph the whole fixed-capacity cache on every
step and copies the new token's K/V back: on a GPU provider the cache goes host -> device each step. Here
each layer's cache is one OrtValue in the provider's memory, bound through IOBinding to the step graph's
`past.*` inputs; the step graph's `new.*` outputs go to fixed device buffers, and a small writer graph
(`ScatterND`, opset 18: every provider runs it, MIGraphX included) writes each into its layer group's next
slot in place: the writer's cache input and output are bound to the same OrtValue, so only the new token's
K/V are written (the masks are updated the same way). Per step only the token ids and the slot numbers go
up, and the logits come down. After prefill, a Pad graph copies each layer's K/V into the first slots of
its cache on the device.

Every buffer keeps its address for the life of the `DeviceCache`, as CUDA-graph replay of the step needs.
The same code runs on the CPU provider with OrtValues in host memory: that is how it is tested without a GPU.
`Transfers` counts what crosses between host and device memory (what would cross PCIe on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from duet_export.errors import DuetError
from duet_export.runtimes.providers import ProviderSettings
from duet_export.runtimes.session import bundle_session_options

__all__ = ["DeviceCache", "Transfers"]

_NUMPY_OF = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
_ONNX_OF = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


@dataclass
class Transfers:
    """Bytes handed between host memory and the provider's memory, counted where the runtime hands them."""

    prefill_to_device: int = 0
    prefill_to_host: int = 0
    step_to_device: int = 0
    step_to_host: int = 0
    steps: int = 0
    by_step: list[int] = field(default_factory=list)

    def step(self, to_device: int, to_host: int) -> None:
        self.step_to_device += to_device
        self.step_to_host += to_host
        self.steps += 1
        self.by_step.append(to_device + to_host)

    def per_step(self) -> float:
        return (self.step_to_device + self.step_to_host) / self.steps if self.steps else 0.0


def _shape_type(arg: ort.NodeArg) -> tuple[list[int], type]:
    if not all(isinstance(d, int) for d in arg.shape):
        raise DuetError(f"{arg.name} has a dynamic shape {arg.shape}: a device cache needs fixed shapes")
    if arg.type not in _NUMPY_OF:
        raise DuetError(f"{arg.name} is {arg.type}, which the device cache does not allocate")
    return list(arg.shape), _NUMPY_OF[arg.type]


def _writer_model(layer_group: list[int], cache: tuple, mask_shapes: list[list[int]]) -> bytes:
    """cache_out.i.{key,value} = ScatterND(cache.i.*, [b, h, slot_g], new.i.*); mask_out.g likewise with 1."""
    (b, h, _, d), dtype = cache
    nodes, inputs, outputs = [], [], []
    bh = np.stack(np.meshgrid(np.arange(b), np.arange(h), indexing="ij"), -1).reshape(b, h, 1, 2)
    rows = np.arange(b).reshape(b, 1, 1)
    const = {"bh": bh, "rows": rows, "s4": [1, 1, 1, 1], "e4": [b, h, 1, 1], "s3": [1, 1, 1], "e3": [b, 1, 1]}
    for name, value in const.items():
        array = numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)
        nodes.append(helper.make_node("Constant", [], [name], value=array))
    nodes.append(
        helper.make_node("Constant", [], ["ones"], value=numpy_helper.from_array(np.ones((b, 1), np.int64)))
    )
    for g, shape in enumerate(mask_shapes):
        inputs += [
            helper.make_tensor_value_info(f"slot.{g}", TensorProto.INT64, [1]),
            helper.make_tensor_value_info(f"mask.{g}", TensorProto.INT64, shape),
        ]
        outputs.append(helper.make_tensor_value_info(f"mask_out.{g}", TensorProto.INT64, shape))
        nodes += [
            helper.make_node("Reshape", [f"slot.{g}", "s4"], [f"slot4.{g}"]),
            helper.make_node("Expand", [f"slot4.{g}", "e4"], [f"slotx.{g}"]),
            helper.make_node("Concat", ["bh", f"slotx.{g}"], [f"index.{g}"], axis=-1),
            helper.make_node("Reshape", [f"slot.{g}", "s3"], [f"slot3.{g}"]),
            helper.make_node("Expand", [f"slot3.{g}", "e3"], [f"slotr.{g}"]),
            helper.make_node("Concat", ["rows", f"slotr.{g}"], [f"mask_index.{g}"], axis=-1),
            helper.make_node("ScatterND", [f"mask.{g}", f"mask_index.{g}", "ones"], [f"mask_out.{g}"]),
        ]
    for i, g in enumerate(layer_group):
        for kind in ("key", "value"):
            shape = [b, h, mask_shapes[g][1], d]
            inputs += [
                helper.make_tensor_value_info(f"cache.{i}.{kind}", _ONNX_OF[dtype], shape),
                helper.make_tensor_value_info(f"new.{i}.{kind}", _ONNX_OF[dtype], [b, h, 1, d]),
            ]
            outputs.append(helper.make_tensor_value_info(f"cache_out.{i}.{kind}", _ONNX_OF[dtype], shape))
            nodes.append(
                helper.make_node(
                    "ScatterND",
                    [f"cache.{i}.{kind}", f"index.{g}", f"new.{i}.{kind}"],
                    [f"cache_out.{i}.{kind}"],
                )
            )
    graph = helper.make_graph(nodes, "duet_cache_writer", inputs, outputs)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10
    ).SerializeToString()


def _start_model(present: dict[str, tuple[list[int], type]], capacity: dict[str, int]) -> bytes:
    """cache_out.i.* = Pad(present.i.*) to the cache's capacity: the prompt's K/V in the first slots."""
    nodes, inputs, outputs = [], [], []
    for name, (shape, dtype) in present.items():
        out = name.replace("present.", "cache_out.")
        pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, capacity[name] - shape[2], 0], np.int64))
        nodes += [
            helper.make_node("Constant", [], [f"pads.{name}"], value=pads),
            helper.make_node("Pad", [name, f"pads.{name}"], [out]),
        ]
        inputs.append(helper.make_tensor_value_info(name, _ONNX_OF[dtype], shape))
        outputs.append(
            helper.make_tensor_value_info(out, _ONNX_OF[dtype], [*shape[:2], capacity[name], shape[3]])
        )
    graph = helper.make_graph(nodes, "duet_cache_start", inputs, outputs)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10
    ).SerializeToString()


class DeviceCache:
    """One bundle's K/V cache and step buffers in device memory (see the module docstring).

    `device` is onnxruntime's OrtValue device ("cuda", or "cpu" for host memory). Holds one generation at a
    time: `start` claims the cache for a new prompt, and a decode state from an earlier prompt is refused.
    """

    def __init__(
        self,
        sessions: dict[str, ort.InferenceSession],
        layer_group: list[int],
        settings: ProviderSettings,
        device: str = "cpu",
    ) -> None:
        self.device, self.device_id = device, settings.device_id
        self.layer_group = layer_group
        self.transfers = Transfers()
        self.owner: object | None = None
        self.prefill_session, self.step_session = sessions["prefill"], sessions["step"]
        # the helper graphs run where vision runs: the bundle's providers, without CUDA-graph capture
        helper_session = sessions["vision"]
        providers = list(zip(helper_session.get_providers(), _provider_options(helper_session), strict=True))
        options = bundle_session_options(settings)

        def value(shape: list[int], dtype: type) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, self.device_id)

        step_in = {a.name: _shape_type(a) for a in self.step_session.get_inputs()}
        step_out = {a.name: _shape_type(a) for a in self.step_session.get_outputs()}
        self.groups = sum(1 for n in step_in if n.startswith("past_mask."))
        self.ids = value(*step_in["input_ids"])
        self.masks = [value(*step_in[f"past_mask.{g}"]) for g in range(self.groups)]
        self.cache = {n: value(*step_in[n]) for n in step_in if n.startswith("past.")}
        self.outputs = {n: value(*spec) for n, spec in step_out.items()}
        self.slots = [value([1], np.int64) for _ in range(self.groups)]
        self.binding = self.step_session.io_binding()
        self.binding.bind_ortvalue_input("input_ids", self.ids)
        for g, mask in enumerate(self.masks):
            self.binding.bind_ortvalue_input(f"past_mask.{g}", mask)
        for name, buffer in self.cache.items():
            self.binding.bind_ortvalue_input(name, buffer)
        for name, buffer in self.outputs.items():
            self.binding.bind_ortvalue_output(name, buffer)

        cache_spec = step_in["past.0.key"]
        mask_shapes = [step_in[f"past_mask.{g}"][0] for g in range(self.groups)]
        self.writer = ort.InferenceSession(
            _writer_model(layer_group, cache_spec, mask_shapes), options, providers=providers
        )
        self.writer_binding = self.writer.io_binding()
        for g in range(self.groups):  # in place: input and output are the same buffer
            self.writer_binding.bind_ortvalue_input(f"slot.{g}", self.slots[g])
            self.writer_binding.bind_ortvalue_input(f"mask.{g}", self.masks[g])
            self.writer_binding.bind_ortvalue_output(f"mask_out.{g}", self.masks[g])
        for i in range(len(layer_group)):
            for kind in ("key", "value"):
                self.writer_binding.bind_ortvalue_input(f"cache.{i}.{kind}", self.cache[f"past.{i}.{kind}"])
                self.writer_binding.bind_ortvalue_input(f"new.{i}.{kind}", self.outputs[f"new.{i}.{kind}"])
                self.writer_binding.bind_ortvalue_output(
                    f"cache_out.{i}.{kind}", self.cache[f"past.{i}.{kind}"]
                )

        pre_out = {a.name: _shape_type(a) for a in self.prefill_session.get_outputs()}
        self.present = {n: spec for n, spec in pre_out.items() if n.startswith("present.")}
        capacity = {n: step_in[n.replace("present.", "past.")][0][2] for n in self.present}
        self.starter = ort.InferenceSession(
            _start_model(self.present, capacity), options, providers=providers
        )
        self.starter_binding = self.starter.io_binding()
        for name in self.present:
            self.starter_binding.bind_ortvalue_output(
                name.replace("present.", "cache_out."), self.cache[name.replace("present.", "past.")]
            )

    def prefill(
        self, feed: dict[str, np.ndarray], masks: Callable[[dict], list[np.ndarray]], owner: object
    ) -> dict[str, np.ndarray]:
        """Run the prefill graph with its K/V outputs left on the device and copied into the cache there;
        `masks(named)` gives each group's capacity-wide mask from the host outputs. Returns the host outputs
        (logits, keep indices)."""
        binding = self.prefill_session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
            self.transfers.prefill_to_device += array.nbytes
        names = [o.name for o in self.prefill_session.get_outputs()]
        for name in names:
            binding.bind_output(name, self.device, self.device_id)
        self.prefill_session.run_with_iobinding(binding)
        values = dict(zip(names, binding.get_outputs(), strict=True))
        host = {}
        for name in names:
            if name in self.present:
                self.starter_binding.bind_ortvalue_input(name, values[name])
            else:
                host[name] = _host_copy(values[name])
                self.transfers.prefill_to_host += host[name].nbytes
        self.starter.run_with_iobinding(self.starter_binding)
        for mask, buffer in zip(masks(host), self.masks, strict=True):
            buffer.update_inplace(np.ascontiguousarray(mask))
            self.transfers.prefill_to_device += mask.nbytes
        self.owner = owner
        return host

    def step(self, tokens: np.ndarray, slots: list[int], owner: object) -> np.ndarray:
        """One decode step: tokens [B, 1] up, the step graph on the bound buffers, the new K/V written into
        `slots` (one per layer group) on the device, logits [B, 1, vocab] down."""
        if owner is not self.owner:
            raise DuetError(
                "this decode state belongs to an earlier prompt: the device cache holds one generation at a time"
            )
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self.ids.update_inplace(tokens)
        self.step_session.run_with_iobinding(self.binding)
        up = tokens.nbytes
        for buffer, slot in zip(self.slots, slots, strict=True):
            slot_value = np.array([slot], dtype=np.int64)
            buffer.update_inplace(slot_value)
            up += slot_value.nbytes
        self.writer.run_with_iobinding(self.writer_binding)
        logits = _host_copy(self.outputs["logits"])
        self.transfers.step(up, logits.nbytes)
        return logits

    def read(self, layer: int, kind: str) -> np.ndarray:
        """A copy of one layer's cache on the host (for tests and inspection; not counted)."""
        return _host_copy(self.cache[f"past.{layer}.{kind}"])


def _host_copy(value: ort.OrtValue) -> np.ndarray:
    """A host array that owns its memory (`OrtValue.numpy()` of host memory is a view of the buffer, which
    the next step overwrites)."""
    return np.array(value.numpy(), copy=True)


def _provider_options(session: ort.InferenceSession) -> list[dict[str, str]]:
    """The options each of the session's providers runs with (only the user-settable ones pass back)."""
    given = session.get_provider_options()
    keep = {"device_id", "migraphx_fp16_enable", "use_tf32"}
    return [{k: v for k, v in given.get(name, {}).items() if k in keep} for name in session.get_providers()]
