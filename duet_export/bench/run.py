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
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from duet_export.bench.flops import prefill_flops
from duet_export.bench.shapes import REAL_WIDTH, SHAPE_FRAMES, SHAPES, shape_spec
from duet_export.config import DuetConfig
from duet_export.errors import DuetError
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.export.precision import Precision
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

ONNX = "onnxruntime"
EAGER = "eager"


@dataclass(frozen=True)
class BenchSettings:
    budgets: tuple[float, ...] = ()  # default: N/3 and N/9 (the paper's 192 and 64 of 576)
    repeats: int = 7
    warmup: int = 2
    decode_tokens: int = 8
    prompt_tokens: int = 32
    provider: str = "cpu"
    # onnxruntime is timed once per thread-pool setting (`runtimes.threads`); the first is the one the
    # ratios use, the others show what it changes (per-session: onnxruntime's spinning default, "before").
    thread_pools: tuple[str, ...] = ("no-spin", "per-session")
    threads: int = 0
    # also time (and measure the peak memory of) the first target and pool with the sessions reading the
    # memory-mapped weights in place (`ProviderSettings.share_weights`, no packed copy per session)
    share_weights: bool = False
    # export targets of the timed bundles, each its own onnxruntime backend (cuda: lowered, static, fused
    # attention; migraphx: the same without the fusion); the first is the one the ratios use
    targets: tuple[str, ...] = ("cpu",)
    cuda_graph: bool = False  # also time the step replayed as a CUDA graph
    dtype: str = "float32"  # weights of the bundles and of the eager model
    # the bundles' linear weights: "float" (the dtype), or "int8" / "int4" (MatMulNBits); eager keeps the
    # dtype's, so the comparison is then quantized onnxruntime against float eager, as the report says
    weights: str = "float"
    eager: bool = True
    eager_device: str = "cpu"
    # PyTorch's OpenMP threads wait by spinning ("active", its default) or sleeping ("passive", as
    # onnxruntime's no-spin). On a machine shared with other jobs the spinning team is stable only when
    # the cores are free (eager TTFT 0.35 s or 5 s on the mini shape, by the moment), so eager is timed
    # under each; the ratios take the faster of them, metric by metric.
    eager_omp: tuple[str, ...] = ("passive", "active")
    # Each backend's rounds are split over this many passes, the backends' processes taking turns
    # (onnxruntime, eager, onnxruntime, eager, ...): one process at a time still, but a change in the
    # machine's load during the run falls on every backend instead of on whichever ran then.
    passes: int = 2
    memory: bool = True
    overhead: bool = True
    sweep: bool = True
    sweep_prompts: tuple[int, ...] = (32, 256)
    sweep_sizes: tuple[int, ...] = (224, 336, 448)
    positions: str | None = None  # the compressed bundles' `positions` (None: the family's default)
    # Export, time and delete one configuration's bundle at a time (bundles of a large model on a small disk).
    discard_bundles: bool = False
    layers: int | None = None  # a named shape's decoder depth, if not its own


@dataclass
class Case:
    name: str
    config: DuetConfig | None
    bundles: dict[str, Path]  # export target -> bundle folder

    @property
    def bundle(self) -> Path:
        """The first target's bundle (stage profiles, memory, KV bytes)."""
        return next(iter(self.bundles.values()))


@dataclass(frozen=True)
class OnnxVariant:
    """One way of running the bundles on onnxruntime, timed as its own backend."""

    target: str
    thread_pool: str
    cuda_graph: bool = False
    share_weights: bool = False

    def label(self, settings: BenchSettings) -> str:
        parts = []
        if len(settings.targets) > 1:
            parts.append(f"{self.target} bundle")
        if self.thread_pool != settings.thread_pools[0]:
            parts.append(f"{self.thread_pool} pools")
        if self.cuda_graph:
            parts.append("CUDA graph")
        if self.share_weights:
            parts.append("shared weights")
        return ONNX + (f" ({', '.join(parts)})" if parts else "")


def onnx_variants(settings: BenchSettings) -> list[OnnxVariant]:
    """The first target under the first thread pool first (the ratios use it), then the others."""
    out = [OnnxVariant(t, pool) for t in settings.targets for pool in settings.thread_pools]
    if settings.cuda_graph:
        out += [OnnxVariant(t, settings.thread_pools[0], True) for t in settings.targets]
    if settings.share_weights:
        out.append(OnnxVariant(settings.targets[0], settings.thread_pools[0], share_weights=True))
    return out


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p25": float(np.percentile(a, 25)),
        "p75": float(np.percentile(a, 75)),
    }


def order_effect(values: list[float], order: list[int]) -> float | None:
    """|median of forward rounds - median of reversed rounds| / median: how much a figure depends on which
    configuration ran before it (None without rounds of both directions)."""
    a, o = np.asarray(values, dtype=np.float64), np.asarray(order)
    if len(a) != len(o) or not (o == 0).any() or not (o == 1).any():
        return None
    return float(abs(np.median(a[o == 0]) - np.median(a[o == 1])) / np.median(a))


def prompt_of(tokens: int) -> str:
    """A question of about `tokens` words from the tiny vocabulary."""
    words = (_WORDS * (tokens // len(_WORDS) + 1))[:tokens]
    return " ".join(words) + "?"


def bench_image(size: int):
    from duet_export.demo import demo_image

    return demo_image(size)


def ensure_model(
    source: str, workdir: Path, image_size: int | None = None, echo=print, layers: int | None = None
) -> Path:
    """A checkpoint directory: `source` itself, or the named shape built (once) under `workdir`
    (`layers`: another decoder depth than the shape's)."""
    if source not in SHAPES:
        return Path(source)
    spec = shape_spec(source, image_size, layers)
    depth = f"-{layers}l" if layers is not None else ""
    path = workdir / f"{source}{depth}-{spec.image_size}px"
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
    """Write the benchmark's input for the worker processes: an image file or a folder of frames."""
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
    if _same_bundle(loaded.path, config, out, options):
        return out
    echo(f"exporting {out.name} ...")
    export_bundle(loaded, out, config, options, echo=lambda m: None, force=True)  # the bench's own cache
    return out


def _same_bundle(model_path: Path, config: DuetConfig | None, out: Path, options: ExportOptions) -> bool:
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return False
    m = json.loads(manifest.read_text())
    return (
        m.get("source_model") == str(model_path)
        and m.get("config") == (config or DuetConfig()).to_dict()
        and m.get("options") == asdict(options)
    )


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


def _worker(spec: dict, echo: Callable[[str], None]) -> dict:
    """Run one backend's worker process; relay its progress; return its result."""
    label = spec["label"]
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, log = Path(tmp) / "spec.json", Path(tmp) / "stderr.log"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **spec.get("env", {})}
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "duet_export.bench.worker", str(spec_file)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
            result = None
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue
                message = json.loads(line)
                if "progress" in message:
                    done, total = message["progress"]
                    echo(f"  {label}: round {done}/{total}")
                elif "result" in message:
                    result = message["result"]
            proc.wait()
        if proc.returncode != 0 or result is None:
            tail = " | ".join(log.read_text().strip().splitlines()[-3:])
            raise DuetError(f"the {label} measurement failed (exit {proc.returncode}): {tail[-400:]}")
    return result


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


def eager_label(omp: str) -> str:
    return f"PyTorch eager (OpenMP {omp})"


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


def _default_budgets(n: int, frames: int) -> tuple[float, ...]:
    """The paper's settings: 192 and 64 of 576 for images; 960 and 136 of 2048 for Video-LLaVA's clips."""
    if frames > 1:
        return (round(n * 960 / 2048, 2), round(n * 136 / 2048, 2))
    return (round(n / 3, 2), round(n / 9, 2))


def _load(model_dir: Path, settings: BenchSettings) -> LoadedModel:
    import torch

    return load(model_dir, dtype=getattr(torch, settings.dtype))


def text_tokens(loaded: LoadedModel, visual, prompt: str) -> int:
    """Text tokens of `prompt` as the chat template writes it (image placeholders not counted): the
    bundles are exported exactly this wide, so onnxruntime and eager process the same sequence."""
    ids = prepare_inputs(loaded.processor, loaded.adapter, [visual], [prompt], None)["input_ids"]
    return int(ids.shape[1]) - loaded.adapter.tokens_per_image(None) * loaded.adapter.geometry().frames


def run_bench(
    source: str, out: Path, settings: BenchSettings | None = None, echo: Callable[[str], None] = print
) -> dict:
    """Run the whole benchmark; returns (and writes to `out/bench.json`) every figure."""
    settings = settings or BenchSettings()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(source, out / "models", echo=echo, layers=settings.layers)
    loaded = _load(model_dir, settings)
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
        config = replace(resolve_budget(b, geometry, rules=adapter.rules), positions=settings.positions)
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
            row["peak_rss_mb_onnx"] = _memory("onnx", case.bundle, prompt, image_file, None)
            if settings.share_weights:
                row["peak_rss_mb_onnx_shared"] = _memory("onnx-shared", case.bundle, prompt, image_file, None)
            if settings.eager:
                row["peak_rss_mb_eager"] = _memory("eager", model_dir, prompt, image_file, case.config)
        if settings.overhead and case.config is not None and settings.targets[0] == "cpu":
            echo(f"profiling the stage nodes of {case.name} ...")
            runs = 2 if heavy else 5
            row["stage_share_custom_op"] = _stage_share(case.bundle, visual, lowered=False, runs=runs)
            row["stage_share_lowered"] = _stage_share(case.bundle, visual, lowered=True, runs=runs)

    def measure(specs: list[dict], passes: int) -> None:
        """Run every spec's worker, `passes` times in turn, each pass a share of the repeats; merge."""
        for p in range(passes):
            for spec in specs:
                repeats = spec["repeats"] // passes + (1 if p < spec["repeats"] % passes else 0)
                if not repeats:
                    continue
                tag = f" pass {p + 1}/{passes}" if passes > 1 else ""
                echo(f"timing {spec['label']} ({len(spec['cases'])} configurations, own process{tag}) ...")
                _merge(backends, spec, _worker({**spec, "repeats": repeats}, echo))

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
        sweep_bundles = _sweep_bundles(source, out, settings, budgets[-1], n, echo)
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
    _fill_timings(rows, backends, primary)
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
        result["sweep"] = _sweep(sweep_bundles, settings, echo)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    return result


def _merge(backends: dict[str, dict], spec: dict, result: dict) -> None:
    """Add one worker pass's rounds to its backend's (values and round directions appended)."""
    entry = backends.setdefault(
        spec["label"], {**{k: v for k, v in result.items() if k != "cases"}, "cases": {}}
    )
    entry["passes"] = entry.get("passes", 0) + 1
    if "thread_pool" in spec:
        entry["thread_pool"] = spec["thread_pool"]
    for name, case in result["cases"].items():
        into = entry["cases"].setdefault(name, {"values": {}, "order": []})
        for key, values in case["values"].items():
            into["values"].setdefault(key, []).extend(values)
        into["order"].extend(case["order"])
        into.update({k: v for k, v in case.items() if k not in ("values", "order")})


def _fill_timings(rows: list[dict], backends: dict[str, dict], primary: str) -> None:
    """Per row: every backend's summaries and order effects; the primary onnxruntime backend's and eager's
    under `onnx_*` / `eager_*`, and the ratios between them."""
    for row in rows:
        row["backends"], row["order_effect"], row["decoder_tokens"], row["transfers"] = {}, {}, {}, {}
        for label, backend in backends.items():
            case = backend["cases"].get(row["name"])
            if case is None:
                continue
            row["backends"][label] = {k: _summary(v) for k, v in case["values"].items()}
            row["order_effect"][label] = {
                k: order_effect(v, case["order"]) for k, v in case["values"].items()
            }
            row["decoder_tokens"][label] = case.get("tokens")
            if case.get("transfers"):
                row["transfers"][label] = case["transfers"]
        timings = {f"onnx_{k}": v for k, v in row["backends"].get(primary, {}).items()}
        row["eager_backend"] = {}
        eager = {label: t for label, t in row["backends"].items() if label.startswith("PyTorch eager")}
        for key in ("ttft", "decode"):  # the faster eager setting, metric by metric (vision/prefill: TTFT's)
            timed = {label: t for label, t in eager.items() if key in t}
            if timed:
                best = min(timed, key=lambda label: timed[label][key]["median"])
                row["eager_backend"][key] = best
                timings[f"eager_{key}"] = timed[best][key]
                if key == "ttft":
                    for part in ("vision", "prefill"):
                        timings[f"eager_{part}"] = timed[best][part]
        row["timings"] = timings
    full = rows[0]["timings"]
    for row in rows:
        t = row["timings"]
        row["flop_ideal_speedup"] = rows[0]["flops_total"] / row["flops_total"]
        if "onnx_ttft" in t:
            row["measured_speedup"] = full["onnx_ttft"]["median"] / t["onnx_ttft"]["median"]
            row["efficiency"] = row["measured_speedup"] / row["flop_ideal_speedup"]
        if "eager_ttft" in t:
            row["eager_speedup"] = full["eager_ttft"]["median"] / t["eager_ttft"]["median"]
            row["eager_efficiency"] = row["eager_speedup"] / row["flop_ideal_speedup"]
        if "eager_ttft" in t and "onnx_ttft" in t:
            row["onnx_vs_eager_ttft"] = t["eager_ttft"]["median"] / t["onnx_ttft"]["median"]
            row["onnx_vs_eager_decode"] = t["eager_decode"]["median"] / t["onnx_decode"]["median"]


def _sweep_bundles(
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
        loaded = _load(
            ensure_model(source, out / "models", size, echo=echo, layers=settings.layers), settings
        )
        geometry = loaded.adapter.geometry()
        config = resolve_budget(geometry.num_patches * fraction, geometry, rules=loaded.adapter.rules)
        config = replace(config, positions=settings.positions)
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


def _sweep(bundles: list[dict], settings: BenchSettings, echo) -> dict:
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
    result = _worker(spec, echo)["cases"]
    points = []
    for full, compressed in zip(bundles[::2], bundles[1::2], strict=True):
        point = {k: full[k] for k in ("prompt_tokens", "patches")} | {"image_size": full["size"]}
        point["full_ttft"] = float(np.median(result[full["name"]]["values"]["ttft"]))
        point["compressed_ttft"] = float(np.median(result[compressed["name"]]["values"]["ttft"]))
        point["speedup"] = point["full_ttft"] / point["compressed_ttft"]
        points.append(point)
    return {"reduction": bundles[0]["reduction"], "points": points}


def check_source(source: str) -> None:
    if source not in SHAPES and not (Path(source) / "config.json").is_file():
        raise DuetError(f"{source}: neither a checkpoint directory nor a known shape ({', '.join(SHAPES)})")
