"""How much of vision + prefill kernel time the Stage 1/2 nodes take, custom op and lowered."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from duet_export.bench.artifacts import prompt_of


def stage_share(bundle: Path, visual, lowered: bool, runs: int = 5) -> dict[str, float]:
    """Share of vision+prefill kernel time spent in the Stage 1/2 nodes (onnxruntime profiling)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from duet_export.passes.cleanup import CleanupPass
    from duet_export.passes.lower import LowerDuetOpsPass
    from duet_export.runtimes.generate import OnnxVLM
    from duet_export.runtimes.threads import session_options

    vlm = OnnxVLM(bundle, provider="cpu")
    feeds = {}
    inputs = vlm._pad_batch(vlm.encode([visual], [prompt_of(8)]))
    feeds["vision"] = {"pixel_values": inputs["pixel_values"]}
    feeds["prefill"] = vlm.prefill_feed(inputs, vlm.vision(inputs["pixel_values"]))
    del vlm
    totals = {"stage": 0.0, "all": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for graph in ("vision", "prefill"):
            path = bundle / f"{graph}.onnx"
            if lowered:
                model = ir.load(path)
                LowerDuetOpsPass()(model)
                CleanupPass()(model)
                path = Path(tmp) / f"{graph}-lowered.onnx"
                ir.save(model, path, external_data=f"{graph}-lowered.data")  # not the bundle's file
            options = session_options()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / f"{graph}-{lowered}")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for _ in range(runs):
                session.run(None, feeds[graph])
            events = json.loads(Path(session.end_profiling()).read_text())
            del session
            for e in events:
                if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                    continue
                totals["all"] += e["dur"]
                if "V2VMerge." in e["name"] or "T2VDrop." in e["name"]:
                    totals["stage"] += e["dur"]
    return {"stage_us": totals["stage"] / runs, "total_us": totals["all"] / runs,
            "share": totals["stage"] / totals["all"] if totals["all"] else float("nan")}  # fmt: skip
