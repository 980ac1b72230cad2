"""`duet-export demo`: the whole flow on a tiny model built here, with no arguments and no downloads."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from duet_export.compression import compress, decompress
from duet_export.config import DuetConfig
from duet_export.generate import Answer, GenerationSettings, generate_answers
from duet_export.loading import LoadedModel, load
from duet_export.stages.budget import report, resolve_budget
from duet_export.tiny import build_tiny_llava

__all__ = ["demo_image", "ensure_tiny_model", "run_demo"]

DEMO_PROMPT = "What digit is in row 2, column 3?"


def demo_image(size: int = 256, seed: int = 0) -> Image.Image:
    """A deterministic picture with a few shapes (the demo needs no data files)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (235, 235, 225))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(0, size - 60, 2)
        r = int(rng.integers(20, 60))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse([x, y, x + r, y + r], fill=color)
        else:
            draw.rectangle([x, y, x + r, y + r], fill=color)
    return img


def ensure_tiny_model(workdir: Path, echo=print) -> Path:
    path = workdir / "tiny-llava"
    if not (path / "config.json").is_file():
        echo(f"building a tiny random LLaVA checkpoint in {path} ...")
        build_tiny_llava(path)
    return path


def _prefill_seconds(
    loaded: LoadedModel, image: Image.Image, config: DuetConfig | None, repeats: int = 5
) -> float:
    from duet_export.inputs import prepare_inputs

    inputs = prepare_inputs(loaded.processor, loaded.adapter, [image], [DEMO_PROMPT], config)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            loaded.model(**inputs, logits_to_keep=1, use_cache=False)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_demo(workdir: Path, budget: float | None = None, echo=print, positions: str | None = None) -> dict:
    """Build/load the tiny model, compress it, answer one prompt with and without compression."""
    model_dir = ensure_tiny_model(workdir, echo)
    loaded = load(model_dir)
    geometry = loaded.adapter.geometry()
    budget = budget if budget is not None else round(geometry.num_patches / 3)
    config = replace(resolve_budget(budget, geometry, rules=loaded.adapter.rules), positions=positions)
    rep = report(config, geometry)
    image = demo_image()
    settings = GenerationSettings(max_new_tokens=12)
    echo(
        f"model: {model_dir} ({loaded.adapter.family}, N={geometry.num_patches} patches, L={geometry.num_layers} layers)"
    )
    echo(f"budget {budget:g} -> {rep.summary()}")
    full = generate_answers(loaded, [image], [DEMO_PROMPT], settings)[0]
    t_full = _prefill_seconds(loaded, image, None)
    compress(loaded.model, config)
    duet = generate_answers(loaded, [image], [DEMO_PROMPT], settings)[0]
    t_duet = _prefill_seconds(loaded, image, config)
    decompress(loaded.model)
    echo(f"prompt: {DEMO_PROMPT}")
    echo(
        f"visual tokens per decoder layer group: {rep.group_tokens} (uncompressed: {geometry.total_patches})"
    )
    echo(f"prompt tokens: {full.prompt_tokens} uncompressed, {duet.prompt_tokens} compressed")
    echo(
        f"prefill (PyTorch, median of 5): {1000 * t_full:.1f} ms uncompressed, {1000 * t_duet:.1f} ms compressed"
    )
    echo("(the tiny model has random weights, so its words are noise; the token counts are the point)")
    echo(f"uncompressed answer: {full.text}")
    echo(f"DUET answer: {duet.text}")
    onnx_answer = _onnx_answer(loaded, workdir / "bundle", config, image, settings, echo)
    same = "the same tokens as" if onnx_answer.token_ids == duet.token_ids else "DIFFERENT tokens from"
    echo(f"DUET answer on onnxruntime ({same} PyTorch): {onnx_answer.text}")
    return {"config": config, "report": rep, "full": full, "duet": duet, "onnx": onnx_answer}


def _onnx_answer(loaded: LoadedModel, bundle_dir: Path, config: DuetConfig, image, settings, echo) -> Answer:
    """Export the compressed model to an ONNX bundle and answer the prompt through onnxruntime."""
    from duet_export.export.bundle import ExportOptions, export_bundle
    from duet_export.runtimes import OnnxVLM

    echo(f"exporting the compressed model to {bundle_dir} (vision, prefill and step graphs) ...")
    options = ExportOptions(target="cpu", max_prompt=32, max_new_tokens=settings.max_new_tokens)
    export_bundle(loaded, bundle_dir, config, options, echo=lambda m: echo("  " + m.strip()))
    vlm = OnnxVLM(bundle_dir, provider="cpu")
    return vlm.generate([image], [DEMO_PROMPT], settings)[0]
