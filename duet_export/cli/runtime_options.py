"""Options of the commands that open a bundle on onnxruntime: generation, provider and thread pools."""

from __future__ import annotations

from collections.abc import Callable

import click

__all__ = [
    "THREAD_POOLS",
    "apply_options",
    "generation_options",
    "provider_options",
    "provider_settings",
    "thread_options",
]

# `duet_export.runtimes.threads.THREAD_POOLS`, default first (spelled out: importing the runtime here would
# load onnxruntime at every command's start).
THREAD_POOLS = ("no-spin", "global", "per-session")


def generation_options(func):
    return apply_options(
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
    )(func)


def provider_options(func):
    return apply_options(
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
            *thread_options(),
        ]
    )(func)


def provider_settings(provider: dict):
    """`ProviderSettings` from the options `provider_options` adds (run, serve)."""
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


def apply_options(options: list) -> Callable:
    """A decorator adding `options` to a command, in the order listed."""

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def thread_options(multiple: bool = False) -> list:
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
