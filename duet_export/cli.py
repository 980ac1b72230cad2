"""The `duet-export` command line: a thin layer over the Python API of the same verbs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click

from duet_export.cli_options import budget_options, config_from_options, config_or_baseline
from duet_export.config import POSITION_MODES
from duet_export.errors import DuetError

# `duet_export.export.precision.WEIGHTS` (export's and bench's --weights), spelled out: importing it here
# would load torch and onnxruntime at every command's start.
WEIGHTS = ("float", "int8", "int4")

__all__ = ["cli", "main"]


def _quiet_libraries() -> None:
    """Keep library chatter (progress bars, backend notices) out of our output."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _note(message: str) -> None:
    click.echo(f"note: {message}", err=True)


def _force_option(what: str):
    return click.option(
        "--force", is_flag=True, help=f"Replace an earlier {what} of duet-export's in the output folder."
    )


def _load(model_dir: str, device: str = "cpu", dtype=None):
    import torch

    from duet_export.loading import load

    return load(model_dir, dtype=dtype or torch.float32, device=device)


class _Group(click.Group):
    """A click group that turns bad input — a `DuetError`, or an option click cannot parse — into one line
    on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DuetError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="duet-export")
def cli() -> None:
    """Compress vision-language models with DUET-VLM and compile them to ONNX with fixed token budgets."""
    _quiet_libraries()


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="duet-demo", show_default=True)
@click.option(
    "--budget", type=float, help="Average visual tokens per layer (default: N/3, the paper's 192 of 576)."
)
@click.option("--positions", type=click.Choice(POSITION_MODES), help="compact (default) or keep.")
def demo(workdir: str, budget: float | None, positions: str | None) -> None:
    """Build a tiny LLaVA, compress it and answer a prompt, with and without DUET."""
    from duet_export.demo import run_demo
    from duet_export.outputs import DEMO, work_folder

    if budget is not None and budget <= 0:
        raise DuetError("--budget must be a positive number of visual tokens")
    with work_folder(workdir, DEMO) as (folder, _):
        run_demo(folder, budget=budget, echo=click.echo, positions=positions)


@cli.command("compress")
@click.argument("model_dir", type=click.Path())
@budget_options
@click.option(
    "--image",
    type=click.Path(),
    help="Answer a prompt about this image (video models: a folder of frames or a video file).",
)
@click.option("--prompt", help="The question (wrapped by the checkpoint's chat template).")
@click.option(
    "--raw", is_flag=True, help="Use --prompt as the full prompt text (it must hold the image placeholder)."
)
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-config", type=click.Path(dir_okay=False), help="Write the resolved DuetConfig as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved budget as JSON.")
@click.option("--device", default="cpu", show_default=True)
def compress_cmd(
    model_dir,
    image,
    prompt,
    raw,
    max_new_tokens,
    sample,
    temperature,
    top_p,
    seed,
    save_config,
    as_json,
    device,
    **opts,
) -> None:
    """Resolve a budget for MODEL_DIR, report it, and optionally answer a prompt with compression on."""
    from duet_export.compression import compress
    from duet_export.generate import GenerationSettings, generate_answers
    from duet_export.loading import load_visual
    from duet_export.outputs import atomic_file, check_output_file
    from duet_export.stages.budget import report

    if (image is None) != (prompt is None):
        raise DuetError("give --image and --prompt together")
    settings = GenerationSettings(max_new_tokens, sample, temperature, 0, top_p, seed).validate()
    if save_config:
        check_output_file(save_config, inputs=[model_dir, image, opts.get("config_file")])
    loaded = _load(model_dir, device)
    config = config_from_options(loaded.adapter, **opts)
    rep = report(config, loaded.adapter.geometry())
    if save_config:
        with atomic_file(save_config) as tmp:
            tmp.write_text(json.dumps({"config": config.to_dict(), "report": rep.to_dict()}, indent=2))
    click.echo(json.dumps(rep.to_dict(), indent=2) if as_json else rep.summary())
    if image is not None:
        img = load_visual(image, loaded.adapter)
        compress(loaded.model, config)
        answer = generate_answers(loaded, [img], [prompt], settings, raw=raw, on_note=_note)[0]
        click.echo(
            f"prompt tokens: {answer.prompt_tokens}, new tokens: {len(answer.token_ids)}, {answer.seconds:.2f} s"
        )
        click.echo(answer.text)


@cli.command("inspect")
@click.argument("model_dir", type=click.Path())
@click.option("--image", type=click.Path(), required=True)
@click.option("--prompt", required=True, help="The question (wrapped by the checkpoint's chat template).")
@click.option(
    "--raw", is_flag=True, help="Use --prompt as the full prompt text (it must hold the image placeholder)."
)
@budget_options
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option(
    "--overlay", type=click.Path(dir_okay=False), help="Write a PNG with the kept patches per stage."
)
@click.option("--device", default="cpu", show_default=True)
def inspect_cmd(model_dir, image, prompt, raw, as_json, overlay, device, **opts) -> None:
    """Show which patches Stage 1 kept and which tokens each Stage-2 drop layer kept, for one image."""
    from duet_export.inspection import inspect_prompt
    from duet_export.loading import load_visual
    from duet_export.outputs import check_output_file
    from duet_export.overlay import write_overlay

    if overlay:
        check_output_file(overlay, inputs=[model_dir, image, opts.get("config_file")])
    loaded = _load(model_dir, device)
    img = load_visual(image, loaded.adapter)
    config = config_from_options(loaded.adapter, **opts)
    info, views = inspect_prompt(loaded, img, prompt, config, raw=raw)
    info["image"] = str(image)
    if overlay:
        write_overlay(overlay, views, info)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    s1 = info["stage1"]
    if s1:
        per_frame = s1 if isinstance(s1, list) else [s1]
        for f, one in enumerate(per_frame):
            where = f"frame {f}: " if isinstance(s1, list) else ""
            cls = "CLS + " if one["cls"] else ""
            click.echo(
                f"Stage 1: {where}{cls}{len(one['dominant'])} dominant patches + "
                f"{len(one['contextual'])} contextual tokens"
            )
            click.echo(f"  dominant: {one['dominant']}")
            for c in one["contextual"]:
                click.echo(f"  anchor {c['anchor']}: members {c['members']}")
    else:
        click.echo(f"Stage 1: off ({info['num_patches']} patches)")
    for d in info["stage2"]:
        click.echo(f"before layer {d['layer']} (keep {d['keep_ratio']}): {len(d['kept'])} kept {d['kept']}")
    if info["queries"]:
        click.echo(f"Stage-2 queries: {' '.join(info['queries'])}")
    click.echo(
        f"average visual tokens per layer: {info['average_tokens']:.2f} ({100 * info['reduction']:.1f} % fewer); "
        f"positions {info['positions']}"
    )
    if overlay:
        click.echo(f"overlay written to {overlay}")


def _visual_tokens(image: dict) -> str:
    """'V' for an image bundle, 'V (F frames x v)' for a clip."""
    frames, per = int(image["frames"]), int(image["tokens_per_image"])
    return str(per) if frames == 1 else f"{frames * per} ({frames} frames x {per})"


@cli.command("export")
@click.argument("model_dir", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@budget_options
@click.option("--no-compress", is_flag=True, help="Export the uncompressed baseline bundle.")
@click.option(
    "--target",
    type=click.Choice(["cpu", "cuda", "migraphx"]),
    default="cpu",
    show_default=True,
    help="Deployment target: picks the pass pipeline (cuda/migraphx: lowered, static).",
)
@click.option("--max-prompt", type=int, default=64, show_default=True, help="Text tokens a prompt may take.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Cache room for new tokens.")
@click.option("--batch", type=int, default=1, show_default=True, help="Prompts per run (fixed).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Float type the graphs compute in (default: float32 for cpu, float16 for cuda and migraphx).",
)
@click.option(
    "--weights",
    type=click.Choice(WEIGHTS),
    default="float",
    show_default=True,
    help="Weight-only quantization of the decoder's and projector's linear layers (onnxruntime's).",
)
@click.option("--block-size", type=int, default=128, show_default=True, help="int4/int8: weights per scale.")
@click.option("--symmetric", is_flag=True, help="int4/int8: symmetric quantization (no zero points).")
@click.option("--quantize-vision", is_flag=True, help="int4/int8: the vision tower's linear layers too.")
@_force_option("bundle")
def export_cmd(
    model_dir, out_dir, no_compress, target, max_prompt, max_new_tokens, batch, dtype, weights, block_size,
    symmetric, quantize_vision, force, **opts,
) -> None:  # fmt: skip
    """Compile MODEL_DIR with a fixed budget into an onnxruntime bundle in OUT_DIR."""
    from duet_export.export.bundle import ExportOptions, export_bundle
    from duet_export.export.precision import DTYPES, Precision, default_dtype
    from duet_export.outputs import BUNDLE, check_output_folder

    dtype = dtype or default_dtype(target)
    precision = Precision(weights, block_size, symmetric, quantize_vision)
    options = ExportOptions(target, max_prompt, max_new_tokens, batch, precision).validate(dtype)
    check_output_folder(out_dir, BUNDLE, inputs=[model_dir, opts.get("config_file")], force=force)
    loaded = _load(model_dir, dtype=DTYPES[dtype])
    config = config_or_baseline(loaded.adapter, no_compress, **opts)
    manifest = export_bundle(loaded, out_dir, config, options, echo=click.echo, force=force)
    budget = manifest["budget"]
    click.echo(
        f"bundle written to {out_dir}: target {target}, {dtype}"
        + (f" with {weights} weights" if weights != "float" else "")
        + f", {_visual_tokens(manifest['image'])} visual tokens "
        f"into the decoder, {budget['average_tokens']:.2f} on average per layer"
    )


def _generation_options(func):
    for option in reversed(
        [
            click.option(
                "--max-new-tokens", type=int, help="1 to the bundle's --max-new-tokens (the default)."
            ),
            click.option("--sample", is_flag=True, help="Sample instead of greedy decoding."),
            click.option("--temperature", type=float, default=1.0, show_default=True),
            click.option("--top-k", type=int, default=0, show_default=True),
            click.option("--top-p", type=float, default=1.0, show_default=True),
            click.option("--seed", type=int, default=0, show_default=True),
        ]
    ):
        func = option(func)
    return func


def _provider_options(func):
    for option in reversed(
        [
            click.option(
                "--provider",
                type=click.Choice(["auto", "migraphx", "cuda", "cpu"]),
                default="auto",
                show_default=True,
                help="auto: MIGraphX, then CUDA, then CPU, as installed.",
            ),
            click.option("--device-id", type=int, default=0, show_default=True),
            click.option("--fp16", is_flag=True, help="MIGraphX: compile in fp16 (migraphx_fp16_enable)."),
            click.option(
                "--cache-dir", type=click.Path(file_okay=False), help="MIGraphX: compiled-model cache."
            ),
            click.option(
                "--cuda-graph", is_flag=True, help="CUDA: capture the static graphs as CUDA graphs."
            ),
            click.option(
                "--tf32", is_flag=True, help="CUDA: TF32 matrix products (faster, fp32 results drift)."
            ),
            *_thread_options(),
        ]
    ):
        func = option(func)
    return func


def _provider_settings(provider: dict):
    """`ProviderSettings` from the options `_provider_options` adds (run, serve)."""
    from duet_export.runtimes import ProviderSettings

    return ProviderSettings(
        provider["device_id"],
        provider["fp16"],
        provider["cache_dir"],
        provider["cuda_graph"],
        provider["tf32"],
        thread_pool=provider["thread_pool"],
        threads=provider["threads"],
        share_weights=provider["share_weights"],
    )


# `duet_export.runtimes.threads.THREAD_POOLS`, default first (spelled out: importing the runtime here would
# load onnxruntime at every command's start).
THREAD_POOLS = ("no-spin", "global", "per-session")


def _apply(options: list) -> Callable:
    """A decorator adding `options` to a command, in the order listed."""

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _thread_options(multiple: bool = False) -> list:
    """--thread-pool / --threads: how the bundle's onnxruntime sessions share the CPU cores."""
    pool_help = (
        "no-spin: each session's idle threads sleep; global: one process-wide pool (refuses other "
        "per-session onnxruntime sessions in the process); per-session: onnxruntime's spinning default."
    )
    return [
        click.option(
            "--thread-pool",
            type=click.Choice(THREAD_POOLS),
            multiple=multiple,
            default=None if multiple else THREAD_POOLS[0],
            show_default=not multiple,
            help=pool_help
            + (
                " Repeat to time each (default: no-spin, and per-session for comparison)." if multiple else ""
            ),
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="onnxruntime intra-op threads per pool (0: one per physical core).",
        ),
        click.option(
            "--share-weights",
            is_flag=True,
            help=(
                "Also time and measure the sessions reading the weights in place (no packed copy each)."
                if multiple
                else "The sessions read the bundle's memory-mapped weights in place instead of each keeping "
                "a packed copy (session.disable_prepacking): about half the memory on CPU, matrix products "
                "may be slower."
            ),
        ),
    ]


@cli.command("run")
@click.argument("bundle", type=click.Path())
@click.option("--image", type=click.Path(), required=True)
@click.option("--prompt", required=True, help="The question (wrapped by the checkpoint's chat template).")
@click.option(
    "--raw", is_flag=True, help="Use --prompt as the full prompt text (it must hold the image placeholder)."
)
@_generation_options
@_provider_options
def run_cmd(
    bundle, image, prompt, raw, max_new_tokens, sample, temperature, top_k, top_p, seed, **provider
) -> None:
    """Answer a prompt about an image with an exported bundle on onnxruntime; the answer is the last line."""
    from duet_export.generate import GenerationSettings
    from duet_export.runtimes import OnnxVLM

    settings = _provider_settings(provider)
    # checked before the bundle is opened; the bundle's own maximum is the default
    given = 1 if max_new_tokens is None else max_new_tokens
    gen = GenerationSettings(given, sample, temperature, top_k, top_p, seed).validate()
    vlm = OnnxVLM(bundle, provider["provider"], settings, on_note=_note)
    if max_new_tokens is None:
        gen = replace(gen, max_new_tokens=vlm.max_new_tokens)
    answer = vlm.generate([image], [prompt], gen, raw=raw)[0]
    click.echo(
        f"{vlm.bundle.provider}: prompt tokens {answer.prompt_tokens}, new tokens {len(answer.token_ids)}, "
        f"{answer.seconds:.2f} s",
        err=True,
    )
    click.echo(answer.text)


@cli.command("serve")
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="0: any free port (printed).")
@click.option(
    "--max-wait-ms",
    type=float,
    default=10.0,
    show_default=True,
    help="How long a request may wait for others to fill the bundle's batch.",
)
@click.option(
    "--allow-files",
    type=click.Path(),
    help="Let requests name image files under this folder (default: data: URLs only).",
)
@click.option("--model-name", help="The model id clients send (default: the bundle folder's name).")
@click.option(
    "--max-image-mb", type=float, default=20.0, show_default=True, help="Largest image a request may send."
)
@click.option("--access-log", is_flag=True, help="Log every request (uvicorn's access log).")
@_provider_options
def serve_cmd(bundle, host, port, max_wait_ms, allow_files, model_name, max_image_mb, access_log, **provider):
    """Serve a bundle over HTTP with OpenAI's chat-completions API, batching waiting requests together."""
    try:
        from duet_export.serve import ServeOptions, serve
    except ImportError as e:
        raise DuetError(f"serve needs the serve extra: pip install 'duet-export[serve]' ({e})") from None

    if max_image_mb <= 0:
        raise DuetError(f"--max-image-mb must be positive, got {max_image_mb}")
    options = ServeOptions(
        host=host,
        port=port,
        provider=provider["provider"],
        max_wait_ms=max_wait_ms,
        allow_files=allow_files,
        model_name=model_name,
        max_image_bytes=int(max_image_mb * 2**20),
        access_log=access_log,
    )
    settings = _provider_settings(provider)
    serve(bundle, options, settings, echo=lambda line: click.echo(line, err=True))


@cli.command("check")
@click.argument("bundle", type=click.Path())
@click.option(
    "--target",
    type=click.Choice(["cpu", "cuda", "migraphx"]),
    help="Verify against this target (default: the bundle's own).",
)
def check_cmd(bundle, target) -> None:
    """Verify a bundle's files, checksums and graphs against a target's rules; exit 1 if any fails."""
    from duet_export.export.check import check_bundle

    reports = check_bundle(bundle, target)
    for report in reports:
        click.echo(report.format())
    failed = [r.graph for r in reports if not r.ok]
    if failed:
        click.echo(f"FAILED: {', '.join(failed)}", err=True)
        raise SystemExit(1)
    click.echo(f"all {len(reports)} graphs pass for {reports[0].target}")


@cli.group("passes")
def passes_group() -> None:
    """The ONNX graph passes and the pipeline each target gets."""


@passes_group.command("list")
def passes_list() -> None:
    """List the passes and each target's pipeline."""
    from duet_export.passes.pipeline import PASSES, PIPELINES

    width = max(len(name) for name in PASSES)
    for name, info in PASSES.items():
        click.echo(f"{name:<{width}}  {info.summary}")
    click.echo("")
    for target, names in PIPELINES.items():
        click.echo(f"--target {target:<9} {' -> '.join(names)}")
    click.echo("--weights int8|int4: quantize runs first (before the stage nodes are lowered)")


@cli.group("data")
def data_group() -> None:
    """Build datasets."""


@data_group.command("griddigits")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--train-images", type=int, default=3000, show_default=True)
@click.option("--test-images", type=int, default=300, show_default=True)
@click.option("--rows", type=int, default=3, show_default=True)
@click.option("--cols", type=int, default=3, show_default=True)
@click.option(
    "--frames", type=int, default=1, show_default=True, help="More than 1: clips of this many grids (video)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--conversations",
    is_flag=True,
    help="A conversation per training image (default: a record per question).",
)
@click.option("--augment", is_flag=True, help="Training digits as random small distortions of their scans.")
@click.option(
    "--train-counts",
    type=int,
    default=1,
    show_default=True,
    help="Count questions per training image; those after the first ask about digits it shows.",
)
@click.option(
    "--locate", is_flag=True, help='Training images also ask "Which cells show a 7?" about a digit they show.'
)
@_force_option("dataset")
def griddigits_cmd(
    out_dir, train_images, test_images, rows, cols, frames, seed, conversations, augment, train_counts, locate,
    force,
) -> None:  # fmt: skip
    """GridDigits-VQA from scikit-learn's handwritten digits: train.json (LLaVA format) + test.jsonl."""
    from duet_export.data.griddigits import GridSpec, build_griddigits
    from duet_export.outputs import DATASET, check_output_folder

    if min(train_images, test_images, rows, cols, frames, train_counts) < 1:
        raise DuetError("image counts, rows, cols, frames and --train-counts must be at least 1")
    check_output_folder(out_dir, DATASET, force=force)
    spec = GridSpec(
        rows=rows, cols=cols, frames=frames, train_images=train_images, test_images=test_images, seed=seed,
        conversations=conversations, augment=augment, train_counts=train_counts, locate=locate,
    )  # fmt: skip
    build_griddigits(out_dir, spec, echo=click.echo, force=force)
    what = f"clips of {frames} frames of" if frames > 1 else "images of"
    click.echo(f"written to {out_dir} ({what} {spec.size[0]}x{spec.size[1]} px)")


def _training_data(data: str, image_folder: str | None, split_turns: bool = False):
    from duet_export.data.records import read_llava_json

    path = Path(data)
    if path.is_dir():
        path = path / "train.json"
    return read_llava_json(path, image_folder, split_turns=split_turns)


@cli.command("train")
@click.argument("model_dir", type=click.Path())
@click.argument("data", type=click.Path())
@click.option("--output", "-o", type=click.Path(file_okay=False), required=True, help="Checkpoint directory.")
@budget_options
@click.option("--no-compress", is_flag=True, help="Train without compression (the baseline).")
@click.option("--image-folder", type=click.Path(file_okay=False), help="Images (default: beside DATA).")
@click.option(
    "--split-turns",
    is_flag=True,
    help="Train each question/answer turn as its own example (default: a conversation is one sequence).",
)
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--warmup", type=int, default=50, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option(
    "--train",
    "parts",
    default="projector,llm",
    show_default=True,
    help="Parts to train: vision,projector,llm or all.",
)
@click.option("--save-steps", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint.")
@click.option("--force", is_flag=True, help="Start over in an --output that holds an earlier run.")
@click.option(
    "--position-squeeze",
    type=float,
    default=0.0,
    show_default=True,
    help="With --no-compress: squeeze each example's visual positions into a random (1-S)..1 of their span, "
    "so that the model does not read image regions by sequence place (which compression renumbers).",
)
def train_cmd(
    model_dir, data, output, no_compress, image_folder, split_turns, steps, batch_size, lr, warmup, grad_accum,
    parts, save_steps, seed, resume, force, position_squeeze, **opts,
) -> None:  # fmt: skip
    """Fine-tune MODEL_DIR on LLaVA-format DATA with DUET in the forward pass (HF Trainer)."""
    from duet_export.training import TrainSettings, parse_parts, train
    from duet_export.training_output import check_training_output

    if min(steps, batch_size, grad_accum, save_steps) < 1 or warmup < 0:
        raise DuetError(
            "--steps, --batch-size, --grad-accum and --save-steps must be at least 1, --warmup 0 or more"
        )
    inputs = [model_dir, data, image_folder, opts.get("config_file")]
    check_training_output(output, resume=resume, force=force, inputs=inputs)
    examples = _training_data(data, image_folder, split_turns)
    loaded = _load(model_dir)
    config = config_or_baseline(loaded.adapter, no_compress, **opts)
    chosen = parse_parts(parts)
    settings = TrainSettings(
        steps=steps, batch_size=batch_size, learning_rate=lr, warmup_steps=warmup, train=chosen,
        save_steps=save_steps, seed=seed, grad_accum=grad_accum, resume=resume, force=force,
        position_squeeze=position_squeeze,
    )  # fmt: skip
    result = train(loaded, examples, output, config, settings, echo=click.echo)
    click.echo(
        f"trained {result.steps} steps on {len(examples)} examples: final loss "
        f"{f'{result.losses[-1]:.4f}' if result.losses else 'n/a (no step ran)'}, "
        f"median step {result.median_step_seconds:.3f} s; checkpoint in {output}"
    )


@cli.command("eval")
@click.argument("target", type=click.Path())
@click.argument("questions", type=click.Path())
@budget_options
@click.option("--no-compress", is_flag=True, help="Evaluate the uncompressed model.")
@click.option("--image-folder", type=click.Path(file_okay=False), help="Images (default: beside QUESTIONS).")
@click.option("--answers", type=click.Path(dir_okay=False), help="Write the answers as JSONL.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-new-tokens", type=int, default=4, show_default=True)
@click.option("--provider", default="cpu", show_default=True, help="Bundles: onnxruntime provider.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_apply(_thread_options())
def eval_cmd(
    target,
    questions,
    no_compress,
    image_folder,
    answers,
    batch_size,
    max_new_tokens,
    provider,
    as_json,
    thread_pool,
    threads,
    share_weights,
    **opts,
) -> None:
    """Accuracy of a checkpoint (with a budget) or of an ONNX bundle on JSONL questions."""
    from duet_export.data.records import read_questions, write_answers
    from duet_export.evaluation import evaluate
    from duet_export.outputs import check_output_file

    if batch_size < 1 or max_new_tokens < 1:
        raise DuetError("--batch-size and --max-new-tokens must be at least 1")
    if answers:
        check_output_file(answers, inputs=[target, questions, image_folder, opts.get("config_file")])
    qs = read_questions(questions, image_folder)
    budget_given = any(
        v not in (None, ()) for k, v in opts.items() if k in ("budget", "dominant", "drop_layers")
    )
    if (Path(target) / "manifest.json").is_file():
        from duet_export.runtimes import OnnxVLM, ProviderSettings

        if budget_given or no_compress:
            raise DuetError("a bundle's budget is fixed at export: give no budget options with a bundle")
        settings = ProviderSettings(thread_pool=thread_pool, threads=threads, share_weights=share_weights)
        subject, config = OnnxVLM(target, provider, settings), None
        if opts.get("positions") not in (None, subject.position_mode):
            raise DuetError(
                f"a bundle's positions are fixed at export: this one has {subject.position_mode} "
                f"(export again with --positions {opts['positions']})"
            )
    else:
        subject = _load(target)
        config = config_or_baseline(subject.adapter, no_compress, **opts)
    with click.progressbar(length=len(qs), label="answering", file=sys.stderr) as bar:
        state = {"done": 0}

        def progress(done, total):
            bar.update(done - state["done"])
            state["done"] = done

        result = evaluate(
            subject, qs, config, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress
        )
    if answers:
        write_answers(answers, result.answers)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.summary())


@cli.command("bench")
@click.argument("model_dir", required=False, type=click.Path())
@click.option(
    "--shape",
    help="A named random model instead of MODEL_DIR (llava-1.5-mini, video-llava-mini, llava-1.5-7b-4l, llava-1.5-7b).",
)
@click.option(
    "--budget",
    "budgets",
    type=float,
    multiple=True,
    help="Budgets to compare (default: N/3 and N/9; video: 960 and 136 of 2048, scaled).",
)
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True)
@click.option("--repeats", type=int, default=7, show_default=True)
@click.option(
    "--passes",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Split each backend's repeats over this many passes, the backends taking turns (load drift "
    "falls on all of them).",
)
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--prompt-tokens", type=int, default=32, show_default=True)
@click.option("--decode-tokens", type=int, default=8, show_default=True)
@click.option("--provider", default="cpu", show_default=True)
@_apply(_thread_options(multiple=True))
@click.option(
    "--target",
    "targets",
    type=click.Choice(["cpu", "cuda", "migraphx"]),
    multiple=True,
    help="Export target of the timed bundles (default cpu; cuda: lowered, static, fused attention; "
    "migraphx: the same without the fusion). Repeat to time each; the first is the one the ratios use.",
)
@click.option("--cuda-graph", is_flag=True, help="CUDA: also time the step replayed as a CUDA graph.")
@click.option(
    "--positions",
    type=click.Choice(POSITION_MODES),
    help="Positions of the compressed bundles: compact (default) or keep (docs/positions.md).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Weights of the bundles and of the eager model (float16: for GPUs).",
)
@click.option(
    "--weights",
    type=click.Choice(WEIGHTS),
    default="float",
    show_default=True,
    help="The bundles' linear weights (int8/int4: MatMulNBits; eager keeps --dtype's).",
)
@click.option("--eager-device", default="cpu", show_default=True, help="PyTorch eager's device (cpu, cuda).")
@click.option(
    "--eager-omp",
    type=click.Choice(["passive", "active"]),
    multiple=True,
    help="How eager's OpenMP threads wait (OMP_WAIT_POLICY); repeat to time each (default both; the "
    "ratios take the faster).",
)
@click.option(
    "--discard-bundles",
    is_flag=True,
    help="Export, time and delete one configuration's bundle at a time (large models, small disks).",
)
@click.option(
    "--layers", type=click.IntRange(min=2), help="--shape only: another decoder depth than the shape's."
)
@click.option("--no-eager", is_flag=True, help="Skip the PyTorch eager measurements.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory subprocesses.")
@click.option("--no-overhead", is_flag=True, help="Skip the profiling of the stage nodes.")
@click.option("--no-sweep", is_flag=True, help="Skip the prompt-length and resolution sweep.")
def bench_cmd(
    model_dir,
    shape,
    budgets,
    out,
    repeats,
    passes,
    warmup,
    prompt_tokens,
    decode_tokens,
    provider,
    thread_pool,
    threads,
    share_weights,
    targets,
    dtype,
    weights,
    eager_device,
    eager_omp,
    **flags,
) -> None:
    """Speed, memory and FLOPs of compressed bundles against the full model, side by side."""
    from duet_export.bench.report import format_report, plot_report
    from duet_export.bench.run import BenchSettings, check_source, run_bench
    from duet_export.outputs import BENCH, atomic_file, work_folder

    if (model_dir is None) == (shape is None):
        raise DuetError("give MODEL_DIR or --shape (e.g. --shape llava-1.5-mini)")
    source = shape or model_dir
    check_source(source)
    if repeats < 1 or warmup < 0 or decode_tokens < 1 or prompt_tokens < 1:
        raise DuetError("--repeats, --decode-tokens and --prompt-tokens must be at least 1")
    if any(b <= 0 for b in budgets):
        raise DuetError("--budget must be a positive number of visual tokens")
    if flags["layers"] is not None and shape is None:
        raise DuetError("--layers changes a named shape's depth: give it with --shape")
    settings = BenchSettings(
        budgets=tuple(budgets), repeats=repeats, passes=passes, warmup=warmup, decode_tokens=decode_tokens,
        prompt_tokens=prompt_tokens, provider=provider, eager=not flags["no_eager"],
        memory=not flags["no_memory"], overhead=not flags["no_overhead"], sweep=not flags["no_sweep"],
        thread_pools=tuple(dict.fromkeys(thread_pool)) or BenchSettings.thread_pools, threads=threads,
        share_weights=share_weights,
        targets=tuple(dict.fromkeys(targets)) or ("cpu",), cuda_graph=flags["cuda_graph"], dtype=dtype,
        weights=weights,
        eager_device=eager_device, eager_omp=tuple(dict.fromkeys(eager_omp)) or BenchSettings.eager_omp,
        discard_bundles=flags["discard_bundles"], layers=flags["layers"], positions=flags["positions"],
    )  # fmt: skip
    with work_folder(out, BENCH, inputs=[model_dir]) as (out_dir, _):
        result = run_bench(source, out_dir, settings, echo=click.echo)
        table = format_report(result)
        with atomic_file(out_dir / "bench.md") as tmp:
            tmp.write_text(table)
        with atomic_file(out_dir / "bench.png") as tmp:
            plot_report(result, tmp)
    click.echo(table)
    click.echo(f"written {out_dir / 'bench.json'}, {out_dir / 'bench.md'}, {out_dir / 'bench.png'}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="duet-export")


if __name__ == "__main__":
    main()
