"""What the benchmark runs on: the model (a named shape built once), its input and the cached bundles."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from duet_export.bench.settings import BenchSettings
from duet_export.bench.shapes import SHAPE_FRAMES, SHAPES, shape_spec
from duet_export.config import DuetConfig
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.inputs import prepare_inputs
from duet_export.loading import LoadedModel, load
from duet_export.tiny import build_tiny_llava, build_tiny_video_llava

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


def load_for_bench(model_dir: Path, settings: BenchSettings) -> LoadedModel:
    import torch

    return load(model_dir, dtype=getattr(torch, settings.dtype))


def text_tokens(loaded: LoadedModel, visual, prompt: str) -> int:
    """Text tokens of `prompt` as the chat template writes it (image placeholders not counted): the
    bundles are exported exactly this wide, so onnxruntime and eager process the same sequence."""
    ids = prepare_inputs(loaded.processor, loaded.adapter, [visual], [prompt], None)["input_ids"]
    return int(ids.shape[1]) - loaded.adapter.tokens_per_image(None) * loaded.adapter.geometry().frames
