"""Commands on an exported bundle: run, serve, check, and the passes a bundle's graphs go through."""

from __future__ import annotations

from dataclasses import replace

import click

from duet_export.cli.app import cli, note
from duet_export.cli.runtime_options import generation_options, provider_options, provider_settings
from duet_export.errors import DuetError


@cli.command("run")
@click.argument("bundle", type=click.Path())
@click.option("--image", type=click.Path(), required=True)
@click.option("--prompt", required=True, help="The question (wrapped by the checkpoint's chat template).")
@click.option(
    "--raw", is_flag=True, help="Use --prompt as the full prompt text (it must hold the image placeholder)."
)
@generation_options
@provider_options
def run_cmd(
    bundle, image, prompt, raw, max_new_tokens, sample, temperature, top_k, top_p, seed, **provider
) -> None:
    """Answer a prompt about an image with an exported bundle on onnxruntime; the answer is the last line."""
    from duet_export.generate import GenerationSettings
    from duet_export.runtimes import OnnxVLM

    settings = provider_settings(provider)
    # checked before the bundle is opened; the bundle's own maximum is the default
    given = 1 if max_new_tokens is None else max_new_tokens
    gen = GenerationSettings(given, sample, temperature, top_k, top_p, seed).validate()
    vlm = OnnxVLM(bundle, provider["provider"], settings, on_note=note)
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
@provider_options
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
    settings = provider_settings(provider)
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
