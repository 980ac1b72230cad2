"""How much a bundle's precision changes what it keeps and says, against its float32 twin.

Exports one checkpoint (default: the tiny LLaVA of the tests, built here) at one budget as float32, float16,
int8 and int4 bundles for the CPU, runs all of them on the same random images and prompt, and reports per
bundle: the share of images whose Stage-1 kept patches and Stage-2 kept tokens equal the float32 bundle's,
the largest first-token logit difference, the share of greedy answers identical to float32's, the bundle's
bytes and its prefill time (median, CPU).

    .venv/bin/python benchmarks/precision.py --out /tmp/precision            # tiny model, 100 images
    .venv/bin/python benchmarks/precision.py --model CKPT --budget 64 --out /tmp/precision

With `--table TABLE_OUT` (the --out of benchmarks/accuracy_table.py) it measures accuracy instead: the
table's trained full model (uncompressed) and each DUET-trained model (with the config it was trained
with) are exported as float32, int8 and int4 CPU bundles and evaluated on the table's test questions,
with the share of answers identical to the float32 bundle's:

    .venv/bin/python benchmarks/precision.py --table results/video --out /tmp/precision-video
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.export.precision import Precision
from duet_export.loading import load
from duet_export.runtimes import OnnxVLM
from duet_export.stages.budget import resolve_budget
from duet_export.tiny import build_tiny_llava

VARIANTS = {  # name: (torch dtype, weights)
    "float32": (torch.float32, "float"),
    "float16": (torch.float16, "float"),
    "int8": (torch.float32, "int8"),
    "int4": (torch.float32, "int4"),
}
PROMPT = "What digit is in row 2, column 3?"


def _images(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(count)]


def _kept(vlm: OnnxVLM, image: Image.Image) -> tuple[dict[str, np.ndarray], np.ndarray, list[int], float]:
    inputs = vlm._pad_batch(vlm.encode([image], [PROMPT]))
    logits_out: list[np.ndarray] = []
    start = time.perf_counter()
    ids = vlm.generate_ids(inputs, vlm_settings(vlm), logits_out=logits_out)
    seconds = vlm.last_state.timings.get("prefill", time.perf_counter() - start)
    return vlm.last_state.keep_index, logits_out[0][0], ids[0].tolist(), seconds


def vlm_settings(vlm: OnnxVLM):
    from duet_export.answers import GenerationSettings

    return GenerationSettings(max_new_tokens=min(8, vlm.max_new_tokens))


def table_accuracy(table: Path, out: Path, block_size: int) -> None:
    """float32 / int8 / int4 bundles of the table's trained models, evaluated on its test questions."""
    from duet_export.config import DuetConfig
    from duet_export.data.records import read_questions
    from duet_export.evaluation import evaluate

    questions = read_questions(table / "data" / "test.jsonl")
    full = table / ("full-counts" if (table / "full-counts" / "config.json").is_file() else "full")
    models = [("full", full)] + [(d.name, d) for d in sorted(table.glob("duet-trained-*")) if d.is_dir()]
    rows, lines = (
        [],
        ["| model | weights | bundle bytes | accuracy | same answer as float32 |", "|---|---|---|---|---|"],
    )
    for label, model_dir in models:
        saved = json.loads((model_dir / "duet_config.json").read_text())
        config = DuetConfig.from_dict(saved) if saved else None
        answers = {}
        for weights in ("float", "int8", "int4"):
            loaded = load(model_dir)
            bundle = out / f"{label}-{weights}"
            options = ExportOptions("cpu", 48, 4, 8, Precision(weights, block_size))
            export_bundle(loaded, bundle, config, options, echo=lambda m: None, force=True)
            vlm = OnnxVLM(bundle, "cpu")
            result = evaluate(vlm, questions, max_new_tokens=4)
            answers[weights] = [a["answer"] for a in result.answers]
            same = sum(a == b for a, b in zip(answers[weights], answers["float"], strict=True))
            size = sum(f["bytes"] for f in vlm.manifest["files"] if f["name"].endswith((".onnx", ".data")))
            rows.append({"model": label, "weights": weights, "bytes": size, "accuracy": result.accuracy,
                         "same_answer": same / len(questions), "config": saved})  # fmt: skip
            lines.append(
                f"| {label} | {weights} | {size:,} | {100 * result.accuracy:.2f} % | {100 * same / len(questions):.1f} % |"
            )
            print(lines[-1], flush=True)
    print("\n".join(lines))
    (out / "accuracy.json").write_text(
        json.dumps({"table": str(table), "questions": len(questions), "rows": rows}, indent=2)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table", type=Path, help="An accuracy_table.py --out: measure accuracy on its models.")
    ap.add_argument("--model", type=Path, help="A checkpoint (default: the tiny LLaVA, built in --out).")
    ap.add_argument("--budget", type=float, default=21.0)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--block-size", type=int, default=32, help="int4/int8 block (the tiny widths are 32-64)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table is not None:
        table_accuracy(args.table, args.out, args.block_size)
        return
    model_dir = args.model or args.out / "tiny-llava"
    if args.model is None and not (model_dir / "config.json").is_file():
        build_tiny_llava(model_dir)
    vlms = {}
    for name, (dtype, weights) in VARIANTS.items():
        loaded = load(model_dir, dtype=dtype)
        config = resolve_budget(args.budget, loaded.adapter.geometry(), rules=loaded.adapter.rules)
        options = ExportOptions("cpu", 32, 8, 1, Precision(weights, args.block_size))
        bundle = args.out / f"bundle-{name}"
        export_bundle(loaded, bundle, config, options, echo=lambda m: None, force=True)
        vlms[name] = OnnxVLM(bundle, "cpu")
    size = vlms["float32"].manifest["image"]["size"][0]
    results = {
        name: {"same_kept": 0, "same_answer": 0, "max_logit_diff": 0.0, "prefill_ms": []} for name in vlms
    }
    for image in _images(args.images, size):
        ref_kept, ref_logits, ref_ids, _ = _kept(vlms["float32"], image)
        for name, vlm in vlms.items():
            kept, logits, ids, seconds = _kept(vlm, image)
            row = results[name]
            row["same_kept"] += all(np.array_equal(kept[k], ref_kept[k]) for k in ref_kept)
            row["same_answer"] += ids == ref_ids
            diff = float(np.abs(logits.astype(np.float32) - ref_logits.astype(np.float32)).max())
            row["max_logit_diff"] = max(row["max_logit_diff"], diff)
            row["prefill_ms"].append(1000 * seconds)
    table = ["| bundle | bytes | same kept tokens | same greedy answer | max logit diff | prefill ms |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in results.items():
        manifest = vlms[name].manifest
        row["bytes"] = sum(f["bytes"] for f in manifest["files"] if f["name"].endswith((".onnx", ".data")))
        row["prefill_ms"] = float(np.median(row["prefill_ms"]))
        table.append(
            f"| {name} | {row['bytes']:,} | {row['same_kept']}/{args.images} | {row['same_answer']}/{args.images} "
            f"| {row['max_logit_diff']:.4f} | {row['prefill_ms']:.2f} |"
        )
    print("\n".join(table))
    (args.out / "precision.json").write_text(
        json.dumps(
            {"args": vars(args) | {"out": str(args.out), "model": str(model_dir)}, "results": results},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
