"""Commands for data, training and evaluation: data griddigits, train, eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from duet_export.cli.app import cli, force_option, load_model
from duet_export.cli.budget_options import budget_options, config_or_baseline
from duet_export.cli.runtime_options import apply_options, thread_options
from duet_export.errors import DuetError


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
@force_option("dataset")
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
    loaded = load_model(model_dir)
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
@apply_options(thread_options())
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
        subject = load_model(target)
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
