"""`duet-export demo`: the whole flow on a tiny model built here, with no arguments and no downloads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from duet_export.compression import compress, decompress
from duet_export.config import NEW_CONFIG_POSITIONS, DuetConfig
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


def _savings(loaded: LoadedModel, config: DuetConfig, text_tokens: int) -> dict[str, tuple[float, float]]:
    """What compression saves on this model whatever its size: the K/V cache after the prompt (bytes) and
    the arithmetic of vision + prefill (FLOPs), uncompressed and compressed."""
    from duet_export.bench.flops import prefill_flops

    adapter, geometry = loaded.adapter, loaded.adapter.geometry()
    text = loaded.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_key_value_heads * head_dim * 4  # K and V, float32
    full_tokens = [
        text_tokens + adapter.uncompressed_tokens_per_image * geometry.frames
    ] * geometry.num_layers
    duet_tokens = [text_tokens + c for c in config.tokens_per_layer(geometry)]
    return {
        "kv_bytes": (per_token * sum(full_tokens), per_token * sum(duet_tokens)),
        "flops": (
            prefill_flops(adapter, None, text_tokens).total,
            prefill_flops(adapter, config, text_tokens).total,
        ),
    }


def run_demo(workdir: Path, budget: float | None = None, echo=print, positions: str | None = None) -> dict:
    """Build/load the tiny model, compress it, answer one prompt with and without compression."""
    model_dir = ensure_tiny_model(workdir, echo)
    loaded = load(model_dir)
    geometry = loaded.adapter.geometry()
    budget = budget if budget is not None else round(geometry.num_patches / 3)
    config = replace(
        resolve_budget(budget, geometry, rules=loaded.adapter.rules),
        positions=positions or NEW_CONFIG_POSITIONS,
    )
    rep = report(config, geometry)
    image = demo_image()
    settings = GenerationSettings(max_new_tokens=12)
    echo(
        f"model: {model_dir} ({loaded.adapter.family}, N={geometry.num_patches} patches, L={geometry.num_layers} layers)"
    )
    echo(f"budget {budget:g} -> {rep.summary()}")
    full = generate_answers(loaded, [image], [DEMO_PROMPT], settings)[0]
    compress(loaded.model, config)
    duet = generate_answers(loaded, [image], [DEMO_PROMPT], settings)[0]
    decompress(loaded.model)
    text_tokens = full.prompt_tokens - loaded.adapter.uncompressed_tokens_per_image * geometry.frames
    saved = _savings(loaded, config, text_tokens)
    echo(f"prompt: {DEMO_PROMPT}")
    echo(
        f"visual tokens per decoder layer group: {rep.group_tokens} (uncompressed: {geometry.total_patches})"
    )
    echo(f"prompt tokens: {full.prompt_tokens} uncompressed, {duet.prompt_tokens} compressed")
    (kv_full, kv_duet), (fl_full, fl_duet) = saved["kv_bytes"], saved["flops"]
    echo(
        f"K/V cache after the prompt: {kv_full / 1024:.0f} KiB uncompressed, {kv_duet / 1024:.0f} KiB compressed "
        f"({kv_full / kv_duet:.1f}x less)"
    )
    echo(
        f"vision + prefill arithmetic: {fl_full / 1e6:.1f} MFLOP uncompressed, {fl_duet / 1e6:.1f} MFLOP "
        f"compressed ({fl_full / fl_duet:.1f}x fewer)"
    )
    echo(
        "(no time is shown: a model this small is timed by per-operator overhead, not arithmetic, so "
        "compression saves no time here; `duet-export bench --shape llava-1.5-mini` measures it at "
        "LLaVA-1.5's geometry)"
    )
    echo("(the tiny model has random weights, so its words are noise; the token counts are the point)")
    echo(f"uncompressed answer: {full.text}")
    echo(f"DUET answer: {duet.text}")
    onnx_answer = _onnx_answer(loaded, workdir / "bundle", config, image, settings, echo)
    same = "the same tokens as" if onnx_answer.token_ids == duet.token_ids else "DIFFERENT tokens from"
    echo(f"DUET answer on onnxruntime ({same} PyTorch): {onnx_answer.text}")
    return {"config": config, "report": rep, "full": full, "duet": duet, "onnx": onnx_answer, **saved}


def _onnx_answer(loaded: LoadedModel, bundle_dir: Path, config: DuetConfig, image, settings, echo) -> Answer:
    """Export the compressed model to an ONNX bundle and answer the prompt through onnxruntime."""
    from duet_export.export.bundle import ExportOptions, export_bundle
    from duet_export.runtimes import OnnxVLM

    echo(f"exporting the compressed model to {bundle_dir} (vision, prefill and step graphs) ...")
    options = ExportOptions(target="cpu", max_prompt=32, max_new_tokens=settings.max_new_tokens)
    export_bundle(loaded, bundle_dir, config, options, echo=lambda m: echo("  " + m.strip()))
    vlm = OnnxVLM(bundle_dir, provider="cpu")
    return vlm.generate([image], [DEMO_PROMPT], settings)[0]
