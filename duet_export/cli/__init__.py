"""The `duet-export` command line: a thin layer over the Python API of the same verbs.

One module per group of commands (model_commands, bundle_commands, training_commands, bench_command),
each adding its commands to the one `cli` group of `app`; importing this package registers them all.
"""

from __future__ import annotations

from duet_export.cli import bench_command, bundle_commands, model_commands, training_commands  # noqa: F401
from duet_export.cli.app import WEIGHTS, cli
from duet_export.cli.runtime_options import THREAD_POOLS

__all__ = ["THREAD_POOLS", "WEIGHTS", "cli", "main"]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="duet-export")
