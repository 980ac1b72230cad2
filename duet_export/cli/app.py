"""The `duet-export` command group, its one-line handling of bad input, and helpers every command uses."""

from __future__ import annotations

import click

from duet_export.errors import DuetError

# `duet_export.export.precision.WEIGHTS` (export's and bench's --weights), spelled out: importing it here
# would load torch and onnxruntime at every command's start.
WEIGHTS = ("float", "int8", "int4")

__all__ = ["WEIGHTS", "cli", "force_option", "load_model", "note"]


def _quiet_libraries() -> None:
    """Keep library chatter (progress bars, backend notices) out of our output."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def note(message: str) -> None:
    click.echo(f"note: {message}", err=True)


def force_option(what: str):
    return click.option(
        "--force", is_flag=True, help=f"Replace an earlier {what} of duet-export's in the output folder."
    )


def load_model(model_dir: str, device: str = "cpu", dtype=None):
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
