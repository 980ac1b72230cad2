"""Commands on a checkpoint: demo, compress, inspect, export."""

from __future__ import annotations

import json

import click

from duet_export.cli.app import WEIGHTS, cli, force_option, load_model, note
from duet_export.cli.budget_options import budget_options, config_from_options, config_or_baseline
from duet_export.config import POSITION_MODES
from duet_export.errors import DuetError


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="duet-demo", show_default=True)
@click.option(
    "--budget", type=float, help="Average visual tokens per layer (default: N/3, the paper's 192 of 576)."
)
@click.option(
    "--positions", type=click.Choice(POSITION_MODES), help="keep (default) or compact (docs/positions.md)."
)
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
    loaded = load_model(model_dir, device)
    config = config_from_options(loaded.adapter, **opts)
    rep = report(config, loaded.adapter.geometry())
    if save_config:
        with atomic_file(save_config) as tmp:
            tmp.write_text(json.dumps({"config": config.to_dict(), "report": rep.to_dict()}, indent=2))
    click.echo(json.dumps(rep.to_dict(), indent=2) if as_json else rep.summary())
    if image is not None:
        img = load_visual(image, loaded.adapter)
        compress(loaded.model, config)
        answer = generate_answers(loaded, [img], [prompt], settings, raw=raw, on_note=note)[0]
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
    loaded = load_model(model_dir, device)
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
@force_option("bundle")
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
    loaded = load_model(model_dir, dtype=DTYPES[dtype])
    config = config_or_baseline(loaded.adapter, no_compress, **opts)
    manifest = export_bundle(loaded, out_dir, config, options, echo=click.echo, force=force)
    budget = manifest["budget"]
    click.echo(
        f"bundle written to {out_dir}: target {target}, {dtype}"
        + (f" with {weights} weights" if weights != "float" else "")
        + f", {_visual_tokens(manifest['image'])} visual tokens "
        f"into the decoder, {budget['average_tokens']:.2f} on average per layer"
    )
