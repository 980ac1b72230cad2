"""Is fused attention worth it on the CPU provider? Times a cpu bundle's prefill and step graphs as exported
and after `FuseAttentionPass` (com.microsoft.MultiHeadAttention), interleaved, in one process.

    .venv/bin/python benchmarks/cpu_attention.py bench-results/bundles/budget-64

This is why the `cpu` pipeline keeps plain attention (docs/bench.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from duet_export.bench.artifacts import bench_image, prompt_of
from duet_export.passes.fuse_attention import FuseAttentionPass
from duet_export.runtimes import OnnxVLM
from duet_export.runtimes.threads import session_options


def _feeds(bundle: Path) -> dict[str, dict[str, np.ndarray]]:
    """The prefill and step graphs' inputs for the bench's image and a 32-word prompt."""
    vlm = OnnxVLM(bundle, provider="cpu", device_cache=False)
    size = vlm.manifest["image"]["size"][0]
    inputs = vlm._pad_batch(vlm.encode([bench_image(size)], [prompt_of(32)]))
    prefill = vlm.prefill_feed(inputs, vlm.vision(inputs["pixel_values"]))
    logits, state = vlm.prefill(inputs)
    step = {"input_ids": logits.argmax(-1).reshape(-1, 1)}
    step |= {f"past_mask.{g}": m for g, m in enumerate(state.masks)}
    for i in range(len(state.keys)):
        step[f"past.{i}.key"], step[f"past.{i}.value"] = state.keys[i], state.values[i]
    return {"prefill": prefill, "step": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle exported for --target cpu")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    feeds = _feeds(args.bundle)
    with tempfile.TemporaryDirectory() as tmp:
        for graph, feed in feeds.items():
            model = ir.load(args.bundle / f"{graph}.onnx")
            FuseAttentionPass()(model)
            fused = Path(tmp) / f"{graph}-fused.onnx"
            ir.save(model, fused, external_data=fused.name + ".data")
            sessions = {
                name: ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
                for name, path in (("plain", args.bundle / f"{graph}.onnx"), ("fused", fused))
            }
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for r in range(args.rounds):
                for name in sessions if r % 2 else reversed(sessions):
                    start = time.perf_counter()
                    sessions[name].run(None, feed)
                    times[name].append(time.perf_counter() - start)
            medians = {name: 1000 * float(np.median(t[2:])) for name, t in times.items()}
            print(
                f"{graph}: plain attention {medians['plain']:.1f} ms, MultiHeadAttention {medians['fused']:.1f} ms"
            )


if __name__ == "__main__":
    main()
