"""The bench command: PyTorch eager against the exported bundles, side by side in one run."""

from __future__ import annotations

import click

from duet_export.cli.app import WEIGHTS, cli
from duet_export.cli.runtime_options import apply_options, thread_options
from duet_export.config import POSITION_MODES
from duet_export.errors import DuetError


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
@apply_options(thread_options(multiple=True))
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
    help="Positions of the compressed bundles: keep (default) or compact (docs/positions.md).",
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
    from duet_export.bench.run import check_source, run_bench
    from duet_export.bench.settings import BenchSettings
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
