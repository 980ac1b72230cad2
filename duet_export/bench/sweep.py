"""Full against compressed time to first token as the prompt and the image grow (one bundle per point)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duet_export.bench.artifacts import (
    bench_image,
    ensure_bundle,
    ensure_model,
    load_for_bench,
    prompt_of,
    save_input,
    text_tokens,
)
from duet_export.bench.processes import timed_in_subprocess
from duet_export.bench.settings import ONNX, BenchSettings
from duet_export.bench.shapes import SHAPES
from duet_export.export.bundle import ExportOptions
from duet_export.export.precision import Precision


def export_sweep_bundles(
    source: str, out: Path, settings: BenchSettings, budget: float, n: int, echo
) -> list[dict]:
    """Export the sweep's bundles: full and compressed (the main budget's fraction) at each prompt length
    and image size. Returns one worker case per bundle."""
    fraction, budget_tag = budget / n, f"{budget:g}"
    base_size = SHAPES[source].image_size
    grid = [(p, base_size) for p in settings.sweep_prompts] + [
        (settings.prompt_tokens, s) for s in settings.sweep_sizes if s != base_size
    ]
    points = []
    for prompt_tokens, size in grid:
        loaded = load_for_bench(
            ensure_model(source, out / "models", size, echo=echo, layers=settings.layers), settings
        )
        geometry = loaded.adapter.geometry()
        config = settings.config(geometry.num_patches * fraction, loaded.adapter)
        image, prompt = bench_image(size), prompt_of(prompt_tokens)
        image_file = save_input(image, out / f"bench-image-{size}px.png")
        options = ExportOptions(
            target=settings.targets[0],
            max_prompt=text_tokens(loaded, image, prompt),
            max_new_tokens=settings.decode_tokens + 2,
            precision=Precision(weights=settings.weights),
        )
        base_point = prompt_tokens == settings.prompt_tokens and size == base_size
        for name, cfg in (("full", None), ("compressed", config)):
            tag = f"sweep-{name}-p{prompt_tokens}-{size}px"
            if base_point and len(settings.targets) == 1:  # the main comparison's bundles
                tag = "full" if cfg is None else f"budget-{budget_tag}"
            bundle = ensure_bundle(loaded, cfg, out / "bundles" / tag, options, echo)
            points.append({"name": f"{name} p{prompt_tokens} {size}px", "bundle": str(bundle),
                           "image": str(image_file), "prompt": prompt, "prompt_tokens": prompt_tokens,
                           "size": size, "patches": geometry.num_patches, "kind": name,
                           "reduction": 1 - fraction})  # fmt: skip
        del loaded
    return points


def time_sweep(bundles: list[dict], settings: BenchSettings, echo) -> dict:
    """Time to first token (vision + prefill) for full vs compressed as the prompt and the image grow."""
    spec = {
        "backend": ONNX,
        "label": "sweep (onnxruntime)",
        "provider": settings.provider,
        "thread_pool": settings.thread_pools[0],
        "threads": settings.threads,
        "cases": [{k: b[k] for k in ("name", "bundle", "image", "prompt")} for b in bundles],
        "warmup": 1,
        "repeats": max(3, settings.repeats // 2),
        "decode_tokens": 0,
        "interleave": True,
    }
    echo("timing the sweep over prompt length and image size (own process) ...")
    result = timed_in_subprocess(spec, echo)["cases"]
    points = []
    for full, compressed in zip(bundles[::2], bundles[1::2], strict=True):
        point = {k: full[k] for k in ("prompt_tokens", "patches")} | {"image_size": full["size"]}
        point["full_ttft"] = float(np.median(result[full["name"]]["values"]["ttft"]))
        point["compressed_ttft"] = float(np.median(result[compressed["name"]]["values"]["ttft"]))
        point["speedup"] = point["full_ttft"] / point["compressed_ttft"]
        points.append(point)
    return {"reduction": bundles[0]["reduction"], "points": points}
