"""Measure compressed bundles side by side with the full model: onnxruntime and PyTorch eager, interleaved.

Every configuration runs once per round, in the same order, for `warmup + repeats` rounds; the first
`warmup` rounds are discarded and the rest summarised as median and interquartile range. Interleaving
keeps slow drifts of a shared machine (thermal, neighbours) from favouring one configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from duet_export.bench.flops import prefill_flops
from duet_export.bench.shapes import SHAPE_FRAMES, SHAPES, shape_spec
from duet_export.compression import compress, decompress
from duet_export.config import DuetConfig
from duet_export.errors import DuetError
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.inputs import prepare_inputs
from duet_export.loading import LoadedModel, load
from duet_export.stages.budget import report, resolve_budget
from duet_export.tiny import build_tiny_llava, build_tiny_video_llava

__all__ = ["BenchSettings", "Case", "run_bench"]

_WORDS = [
    "what",
    "digit",
    "is",
    "shown",
    "in",
    "the",
    "second",
    "row",
    "and",
    "third",
    "column",
    "of",
    "the",
    "grid",
    "in",
    "this",
    "picture",
]


@dataclass(frozen=True)
class BenchSettings:
    budgets: tuple[float, ...] = ()  # default: N/3 and N/9 (the paper's 192 and 64 of 576)
    repeats: int = 7
    warmup: int = 2
    decode_tokens: int = 8
    prompt_tokens: int = 32
    provider: str = "cpu"
    eager: bool = True
    memory: bool = True
    overhead: bool = True
    sweep: bool = True
    sweep_prompts: tuple[int, ...] = (32, 256)
    sweep_sizes: tuple[int, ...] = (224, 336, 448)


@dataclass
class Case:
    name: str
    config: DuetConfig | None
    bundle: Path
    results: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p25": float(np.percentile(a, 25)),
        "p75": float(np.percentile(a, 75)),
    }


def prompt_of(tokens: int) -> str:
    """A question of about `tokens` words from the tiny vocabulary."""
    words = (_WORDS * (tokens // len(_WORDS) + 1))[:tokens]
    return " ".join(words) + "?"


def bench_image(size: int):
    from duet_export.demo import demo_image

    return demo_image(size)


def ensure_model(source: str, workdir: Path, image_size: int | None = None, echo=print) -> Path:
    """A checkpoint directory: `source` itself, or the named shape built (once) under `workdir`."""
    if source not in SHAPES:
        return Path(source)
    spec = shape_spec(source, image_size)
    path = workdir / f"{source}-{spec.image_size}px"
    if not (path / "config.json").is_file():
        echo(
            f"building the random {source} model at {spec.image_size} px in {path} (speed needs no trained weights)"
        )
        if source in SHAPE_FRAMES:
            build_tiny_video_llava(path, spec, frames=SHAPE_FRAMES[source])
        else:
            build_tiny_llava(path, spec)
    return path


def bench_input(adapter, size: int):
    """The benchmark's visual input: the demo image, or for a video model a clip of shifted copies of it."""
    image = bench_image(size)
    if adapter.media != "video":
        return image
    return [image.rotate(15 * f) for f in range(adapter.frames)]


def save_input(visual, path: Path) -> Path:
    """Write the benchmark's input for the memory subprocesses: an image file or a folder of frames."""
    if isinstance(visual, list):
        path.mkdir(parents=True, exist_ok=True)
        for f, frame in enumerate(visual):
            frame.save(path / f"{f:02d}.png")
    else:
        visual.save(path)
    return path


def ensure_bundle(
    loaded: LoadedModel, config: DuetConfig | None, out: Path, options: ExportOptions, echo
) -> Path:
    """Export, or reuse a bundle in `out` that was made from the same model, config and options."""
    manifest = out / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        same = (
            m.get("source_model") == str(loaded.path)
            and m.get("config") == (config or DuetConfig()).to_dict()
            and m.get("options") == asdict(options)
        )
        if same:
            return out
    echo(f"exporting {out.name} ...")
    export_bundle(loaded, out, config, options, echo=lambda m: None, force=True)  # the bench's own cache
    return out


def _kv_bytes(manifest: dict, lengths: list[int]) -> int:
    kv = manifest["kv"]
    per_token = 2 * kv["num_kv_heads"] * kv["head_dim"] * (2 if manifest["dtype"] == "float16" else 4)
    return int(sum(per_token * lengths[g] * manifest["batch"] for g in manifest["layer_group_of"]))


def _onnx_round(vlm, inputs, decode_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    logits, state = vlm.prefill(inputs)
    token = logits.argmax(-1)
    ttft = time.perf_counter() - start
    steps = []
    for _ in range(decode_tokens):
        s = time.perf_counter()
        token = vlm.step(token, state).argmax(-1)
        steps.append(time.perf_counter() - s)
    return {"vision": state.timings["vision"], "prefill": state.timings["prefill"], "ttft": ttft,
            "decode": float(np.median(steps))}  # fmt: skip


def _eager_round(
    loaded: LoadedModel, config: DuetConfig | None, inputs, decode_tokens: int
) -> dict[str, float]:
    model = loaded.model
    if config is not None:
        compress(model, config)
    else:
        decompress(model)
    with torch.no_grad():
        s = time.perf_counter()
        if config is not None:
            pixels = inputs.get("pixel_values", inputs.get("pixel_values_videos"))
            loaded.adapter.visual_features(pixels.flatten(0, pixels.dim() - 4), config)
        elif "pixel_values_videos" in inputs:
            model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
        else:
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
        vision = time.perf_counter() - s
        start = time.perf_counter()
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft = time.perf_counter() - start
        cache, mask = out.cache, inputs["attention_mask"]
        steps = []
        for _ in range(decode_tokens):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            s = time.perf_counter()
            out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - s)
            cache = out.cache
    decompress(model)
    return {"vision": vision, "prefill": ttft - vision, "ttft": ttft, "decode": float(np.median(steps))}


def _memory(kind: str, path: Path, prompt: str, image_file: Path, config: DuetConfig | None) -> float | None:
    cmd = [sys.executable, "-m", "duet_export.bench.memory", kind, str(path), prompt, str(image_file)]
    cmd.append(json.dumps(config.to_dict()) if config is not None else "null")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    lines = [x for x in proc.stdout.strip().splitlines() if x.startswith("{")]
    return json.loads(lines[-1])["peak_rss_mb"] if proc.returncode == 0 and lines else None


def _stage_share(bundle: Path, visual, lowered: bool, runs: int = 5) -> dict[str, float]:
    """Share of vision+prefill kernel time spent in the Stage 1/2 nodes (onnxruntime profiling)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from duet_export.passes.cleanup import CleanupPass
    from duet_export.passes.lower import LowerDuetOpsPass
    from duet_export.runtimes.generate import OnnxVLM

    vlm = OnnxVLM(bundle, provider="cpu")
    feeds = {}
    inputs = vlm._pad_batch(vlm.encode([visual], [prompt_of(8)]))
    feeds["vision"] = {"pixel_values": inputs["pixel_values"]}
    feeds["prefill"] = vlm.prefill_feed(inputs, vlm.vision(inputs["pixel_values"]))
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
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / f"{graph}-{lowered}")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for _ in range(runs):
                session.run(None, feeds[graph])
            events = json.loads(Path(session.end_profiling()).read_text())
            for e in events:
                if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                    continue
                totals["all"] += e["dur"]
                if "V2VMerge." in e["name"] or "T2VDrop." in e["name"]:
                    totals["stage"] += e["dur"]
    return {"stage_us": totals["stage"] / runs, "total_us": totals["all"] / runs,
            "share": totals["stage"] / totals["all"] if totals["all"] else float("nan")}  # fmt: skip


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
    model_dir = ensure_model(source, out / "models", echo=echo)
    loaded = load(model_dir)
    geometry = loaded.adapter.geometry()
    n = geometry.total_patches
    budgets = settings.budgets or _default_budgets(n, geometry.frames)
    options = ExportOptions(
        target="cpu", max_prompt=settings.prompt_tokens + 16, max_new_tokens=settings.decode_tokens + 2
    )
    cases = [Case("full", None, out / "bundles" / "full")]
    for b in budgets:
        config = resolve_budget(b, geometry, rules=loaded.adapter.rules)
        cases.append(Case(f"budget {b:g}", config, out / "bundles" / f"budget-{b:g}"))
    for case in cases:
        ensure_bundle(loaded, case.config, case.bundle, options, echo)

    from duet_export.runtimes import OnnxVLM

    image = bench_input(loaded.adapter, loaded.adapter.image_size)
    prompt = prompt_of(settings.prompt_tokens)
    vlms = {c.name: OnnxVLM(c.bundle, provider=settings.provider) for c in cases}
    onnx_inputs = {c.name: vlms[c.name]._pad_batch(vlms[c.name].encode([image], [prompt])) for c in cases}
    eager_inputs = {
        c.name: prepare_inputs(loaded.processor, loaded.adapter, [image], [prompt], c.config) for c in cases
    }
    rounds = settings.warmup + settings.repeats
    echo(
        f"measuring {len(cases)} configurations x {rounds} interleaved rounds ({settings.warmup} warm-up) ..."
    )
    for r in range(rounds):
        for case in cases:
            onnx = _onnx_round(vlms[case.name], onnx_inputs[case.name], settings.decode_tokens)
            eager = (
                _eager_round(loaded, case.config, eager_inputs[case.name], settings.decode_tokens)
                if settings.eager
                else {}
            )
            if r >= settings.warmup:
                for k, v in onnx.items():
                    case.add(f"onnx_{k}", v)
                for k, v in eager.items():
                    case.add(f"eager_{k}", v)
    full_flops = prefill_flops(loaded.adapter, None, settings.prompt_tokens).total
    rows = []
    image_file = save_input(image, out / ("bench-clip" if isinstance(image, list) else "bench-image.png"))
    for case in cases:
        manifest = vlms[case.name].manifest
        flops = prefill_flops(loaded.adapter, case.config, settings.prompt_tokens)
        rep = report(case.config, geometry) if case.config is not None else None
        row = {
            "name": case.name,
            "config": case.config.to_dict() if case.config is not None else None,
            "average_tokens": rep.average_tokens if rep else float(n),
            "reduction": rep.reduction if rep else 0.0,
            "group_tokens": rep.group_tokens if rep else [n],
            "flops_vision": flops.vision,
            "flops_prefill": flops.decoder,
            "flops_total": flops.total,
            "flop_ideal_speedup": full_flops / flops.total,
            "kv_bytes_prefill": _kv_bytes(manifest, manifest["group_lengths"]),
            "kv_bytes_capacity": _kv_bytes(manifest, manifest["cache_capacity"]),
            "timings": {k: _summary(v) for k, v in case.results.items()},
        }
        if settings.memory:
            echo(f"peak memory of {case.name} (fresh processes) ...")
            row["peak_rss_mb_onnx"] = _memory("onnx", case.bundle, prompt, image_file, None)
            if settings.eager:
                row["peak_rss_mb_eager"] = _memory("eager", model_dir, prompt, image_file, case.config)
        if settings.overhead and case.config is not None:
            echo(f"profiling the stage nodes of {case.name} ...")
            row["stage_share_custom_op"] = _stage_share(case.bundle, image, lowered=False)
            row["stage_share_lowered"] = _stage_share(case.bundle, image, lowered=True)
        rows.append(row)
    full = rows[0]["timings"]
    for row in rows:
        t = row["timings"]
        row["measured_speedup"] = full["onnx_ttft"]["median"] / t["onnx_ttft"]["median"]
        row["efficiency"] = row["measured_speedup"] / row["flop_ideal_speedup"]
        if "eager_ttft" in t:
            row["onnx_vs_eager_ttft"] = t["eager_ttft"]["median"] / t["onnx_ttft"]["median"]
            row["onnx_vs_eager_decode"] = t["eager_decode"]["median"] / t["onnx_decode"]["median"]
    result = {
        "source": source,
        "model_dir": str(model_dir),
        "weights": "random (speed does not depend on trained weights)" if source in SHAPES else "as given",
        "geometry": {"num_patches": n, "frames": geometry.frames, "num_layers": geometry.num_layers},
        "settings": asdict(settings),
        "provider": vlms["full"].bundle.provider,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    if settings.sweep and source in SHAPES and source not in SHAPE_FRAMES:
        result["sweep"] = _sweep(source, out, settings, budgets[-1], n, echo)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    return result


def _prefill_median(bundle: Path, prompt: str, image, repeats: int, provider: str) -> float:
    from duet_export.runtimes import OnnxVLM

    vlm = OnnxVLM(bundle, provider=provider)
    inputs = vlm._pad_batch(vlm.encode([image], [prompt]))
    times = []
    for i in range(repeats + 1):
        s = time.perf_counter()
        vlm.prefill(inputs)
        if i:
            times.append(time.perf_counter() - s)
    return float(np.median(times))


def _sweep(source: str, out: Path, settings: BenchSettings, budget: float, n: int, echo) -> dict:
    """Time to first token (vision + prefill) for full vs compressed as the prompt and the image grow."""
    points = []
    fraction, budget_tag = budget / n, f"{budget:g}"
    base_size = SHAPES[source].image_size
    grid = [(p, base_size) for p in settings.sweep_prompts] + [
        (settings.prompt_tokens, s) for s in settings.sweep_sizes if s != base_size
    ]
    for prompt_tokens, size in grid:
        loaded = load(ensure_model(source, out / "models", size, echo=echo))
        geometry = loaded.adapter.geometry()
        config = resolve_budget(geometry.num_patches * fraction, geometry, rules=loaded.adapter.rules)
        options = ExportOptions(
            target="cpu", max_prompt=prompt_tokens + 16, max_new_tokens=settings.decode_tokens + 2
        )
        base_point = prompt_tokens == settings.prompt_tokens and size == base_size
        image = bench_image(size)
        prompt = prompt_of(prompt_tokens)
        point = {"prompt_tokens": prompt_tokens, "image_size": size, "patches": geometry.num_patches}
        for name, cfg in (("full", None), ("compressed", config)):
            tag = f"sweep-{name}-p{prompt_tokens}-{size}px"
            if base_point:  # the main comparison's bundles
                tag = "full" if cfg is None else f"budget-{budget_tag}"
            bundle = ensure_bundle(loaded, cfg, out / "bundles" / tag, options, echo)
            point[f"{name}_ttft"] = _prefill_median(
                bundle, prompt, image, max(3, settings.repeats // 2), settings.provider
            )
        point["speedup"] = point["full_ttft"] / point["compressed_ttft"]
        echo(f"  prompt {prompt_tokens:>4} tokens, {geometry.num_patches:>4} patches: full "
             f"{1000 * point['full_ttft']:.1f} ms, compressed {1000 * point['compressed_ttft']:.1f} ms")  # fmt: skip
        points.append(point)
    return {"reduction": 1 - fraction, "points": points}


def check_source(source: str) -> None:
    if source not in SHAPES and not (Path(source) / "config.json").is_file():
        raise DuetError(f"{source}: neither a checkpoint directory nor a known shape ({', '.join(SHAPES)})")
