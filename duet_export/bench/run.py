"""Measure compressed bundles side by side with the full model: onnxruntime and PyTorch eager.

Each backend is timed in a process of its own (`duet_export.bench.worker`), one after another: onnxruntime
under each requested export target, thread-pool setting and CUDA-graph choice, then PyTorch eager with its
OpenMP threads waiting passively and actively (the ratios take the faster eager, metric by metric). So no
backend's threads (onnxruntime's pools, PyTorch's OpenMP team) share the cores with another's while it is
timed. Each backend's repeats are split over `passes` (default 2) in which the backends' processes take
turns, so that a change of the machine's load during the run falls on all of them. Inside a worker,
every configuration runs once per round, after warm-up rounds; measured rounds alternate between the
listed order and its reverse, and the report gives the difference of the two (the order effect) next to
the medians and interquartile ranges.

Both backends see the same tokens: bundles are exported with exactly the prompt's text length (no padding),
so the onnxruntime prefill and the eager forward process the same sequence; `decoder_tokens` records both.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from duet_export.bench.artifacts import (
    bench_input,
    ensure_bundle,
    ensure_model,
    load_for_bench,
    prompt_of,
    save_input,
    text_tokens,
)
from duet_export.bench.flops import prefill_flops
from duet_export.bench.processes import peak_memory, timed_in_subprocess
from duet_export.bench.profile import stage_share
from duet_export.bench.settings import EAGER, ONNX, BenchSettings, Case, eager_label, onnx_variants
from duet_export.bench.shapes import REAL_WIDTH, SHAPE_FRAMES, SHAPES
from duet_export.bench.sweep import export_sweep_bundles, time_sweep
from duet_export.bench.timings import fill_timings, merge_pass
from duet_export.errors import DuetError
from duet_export.export.bundle import ExportOptions
from duet_export.export.precision import Precision
from duet_export.loading import LoadedModel
from duet_export.stages.budget import report

__all__ = ["check_source", "run_bench"]


def _kv_bytes(manifest: dict, lengths: list[int]) -> int:
    kv = manifest["kv"]
    per_token = 2 * kv["num_kv_heads"] * kv["head_dim"] * (4 if manifest["dtype"] == "float32" else 2)
    return int(sum(per_token * lengths[g] * manifest["batch"] for g in manifest["layer_group_of"]))


def _bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())


def _available_bytes() -> int:
    """Memory available for bundles' sessions (unbounded where the platform does not say)."""
    from duet_export.runtimes.session import available_memory

    return available_memory() or 1 << 62


def _onnx_specs(cases: list[Case], inputs: dict, settings: BenchSettings) -> list[dict]:
    specs = []
    for variant in onnx_variants(settings):
        fits = sum(_bundle_bytes(c.bundles[variant.target]) for c in cases) * 1.3 < 0.6 * _available_bytes()
        specs.append({
            "backend": ONNX,
            "label": variant.label(settings),
            "target": variant.target,
            "provider": settings.provider,
            "thread_pool": variant.thread_pool,
            "threads": settings.threads,
            "cuda_graph": variant.cuda_graph,
            "share_weights": variant.share_weights,
            "cases": [{"name": c.name, "bundle": str(c.bundles[variant.target]), **inputs[c.name]} for c in cases],
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "decode_tokens": settings.decode_tokens,
            "interleave": fits,
        })  # fmt: skip
    return specs


def _eager_spec(cases: list[Case], inputs: dict, model_dir: Path, settings: BenchSettings, omp: str) -> dict:
    return {
        "backend": EAGER,
        "label": eager_label(omp),
        "env": {"OMP_WAIT_POLICY": omp.upper()},
        "model_dir": str(model_dir),
        "dtype": settings.dtype,
        "device": settings.eager_device,
        "cases": [
            {"name": c.name, "config": c.config.to_dict() if c.config else None, **inputs[c.name]}
            for c in cases
        ],
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "decode_tokens": settings.decode_tokens,
        "interleave": True,
    }


def _default_budgets(n: int, frames: int) -> tuple[float, ...]:
    """The paper's settings: 192 and 64 of 576 for images; 960 and 136 of 2048 for Video-LLaVA's clips."""
    if frames > 1:
        return (round(n * 960 / 2048, 2), round(n * 136 / 2048, 2))
    return (round(n / 3, 2), round(n / 9, 2))


def run_bench(
    source: str, out: Path, settings: BenchSettings | None = None, echo: Callable[[str], None] = print
) -> dict:
    """Run the whole benchmark; returns (and writes to `out/bench.json`) every figure."""
    settings = settings or BenchSettings()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(source, out / "models", echo=echo, layers=settings.layers)
    loaded = load_for_bench(model_dir, settings)
    adapter = loaded.adapter
    geometry = adapter.geometry()
    n = geometry.total_patches
    budgets = settings.budgets or _default_budgets(n, geometry.frames)
    visual = bench_input(adapter, adapter.image_size)
    prompt = prompt_of(settings.prompt_tokens)
    width = text_tokens(loaded, visual, prompt)
    options = {
        t: ExportOptions(
            target=t,
            max_prompt=width,
            max_new_tokens=settings.decode_tokens + 2,
            precision=Precision(weights=settings.weights),
        ).validate(settings.dtype)
        for t in settings.targets
    }

    def folders(tag: str) -> dict[str, Path]:
        one = len(settings.targets) == 1
        return {t: out / "bundles" / (tag if one else f"{tag}-{t}") for t in settings.targets}

    cases = [Case("full", None, folders("full"))]
    for b in budgets:
        config = settings.config(b, adapter)
        adapter.position_mode(config)  # a choice the family cannot honour: one line, before any export
        cases.append(Case(f"budget {b:g}", config, folders(f"budget-{b:g}")))
    image_file = save_input(visual, out / ("bench-clip" if isinstance(visual, list) else "bench-image.png"))
    inputs = {c.name: {"image": str(image_file), "prompt": prompt} for c in cases}
    rows = []
    for case in cases:
        flops = prefill_flops(adapter, case.config, width)
        rep = report(case.config, geometry) if case.config is not None else None
        rows.append({
            "name": case.name,
            "config": case.config.to_dict() if case.config is not None else None,
            "average_tokens": rep.average_tokens if rep else float(n),
            "reduction": rep.reduction if rep else 0.0,
            "group_tokens": rep.group_tokens if rep else [n],
            "flops_vision": flops.vision,
            "flops_prefill": flops.decoder,
            "flops_total": flops.total,
        })  # fmt: skip
    heavy = source in REAL_WIDTH or settings.discard_bundles
    backends: dict[str, dict] = {}

    def extras(case: Case, row: dict) -> None:
        """Memory, stage-node profile and KV bytes of one case (while its bundle exists)."""
        manifest = json.loads((case.bundle / "manifest.json").read_text())
        row["kv_bytes_prefill"] = _kv_bytes(manifest, manifest["group_lengths"])
        row["kv_bytes_capacity"] = _kv_bytes(manifest, manifest["cache_capacity"])
        row["bundle_bytes"] = _bundle_bytes(case.bundle)
        if settings.memory:
            echo(f"peak memory of {case.name} (fresh processes) ...")
            row["peak_rss_mb_onnx"] = peak_memory("onnx", case.bundle, prompt, image_file, None)
            if settings.share_weights:
                row["peak_rss_mb_onnx_shared"] = peak_memory(
                    "onnx-shared", case.bundle, prompt, image_file, None
                )
            if settings.eager:
                row["peak_rss_mb_eager"] = peak_memory("eager", model_dir, prompt, image_file, case.config)
        if settings.overhead and case.config is not None and settings.targets[0] == "cpu":
            echo(f"profiling the stage nodes of {case.name} ...")
            runs = 2 if heavy else 5
            row["stage_share_custom_op"] = stage_share(case.bundle, visual, lowered=False, runs=runs)
            row["stage_share_lowered"] = stage_share(case.bundle, visual, lowered=True, runs=runs)

    def measure(specs: list[dict], passes: int) -> None:
        """Run every spec's worker, `passes` times in turn, each pass a share of the repeats; merge."""
        for p in range(passes):
            for spec in specs:
                repeats = spec["repeats"] // passes + (1 if p < spec["repeats"] % passes else 0)
                if not repeats:
                    continue
                tag = f" pass {p + 1}/{passes}" if passes > 1 else ""
                echo(f"timing {spec['label']} ({len(spec['cases'])} configurations, own process{tag}) ...")
                merge_pass(backends, spec, timed_in_subprocess({**spec, "repeats": repeats}, echo))

    def export(case: Case, model: LoadedModel) -> None:
        for target, folder in case.bundles.items():
            ensure_bundle(model, case.config, folder, options[target], echo)

    if settings.discard_bundles:  # one configuration's bundles on disk at a time
        for case, row in zip(cases, rows, strict=True):
            export(case, loaded)
            measure(_onnx_specs([case], inputs, settings), 1)
            extras(case, row)
            for folder in case.bundles.values():
                shutil.rmtree(folder)
    else:
        for case in cases:
            export(case, loaded)
    sweep_bundles = None
    if settings.sweep and source in SHAPES and source not in SHAPE_FRAMES and not heavy:
        sweep_bundles = export_sweep_bundles(source, out, settings, budgets[-1], n, echo)
    del loaded, adapter
    gc.collect()  # the workers load what they need; this process should hold no model while they run
    specs = [] if settings.discard_bundles else _onnx_specs(cases, inputs, settings)
    if settings.eager:
        specs += [_eager_spec(cases, inputs, model_dir, settings, omp) for omp in settings.eager_omp]
    measure(specs, 1 if settings.discard_bundles else max(1, settings.passes))
    if not settings.discard_bundles:
        for case, row in zip(cases, rows, strict=True):
            extras(case, row)
    primary = onnx_variants(settings)[0].label(settings)
    fill_timings(rows, backends, primary)
    result = {
        "source": source,
        "model_dir": str(model_dir),
        "weights": "random (speed does not depend on trained weights)" if source in SHAPES else "as given",
        "geometry": {"num_patches": n, "frames": geometry.frames, "num_layers": geometry.num_layers},
        "settings": asdict(settings),
        "provider": settings.provider,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "primary": primary,
        "backends": {k: {kk: vv for kk, vv in v.items() if kk != "cases"} for k, v in backends.items()},
        "real_width": source in REAL_WIDTH,
        "rows": rows,
    }
    if sweep_bundles:
        result["sweep"] = time_sweep(sweep_bundles, settings, echo)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    return result


def check_source(source: str) -> None:
    if source not in SHAPES and not (Path(source) / "config.json").is_file():
        raise DuetError(f"{source}: neither a checkpoint directory nor a known shape ({', '.join(SHAPES)})")
