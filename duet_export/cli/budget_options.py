"""Options shared by every command that compresses: `--budget B` or the explicit knobs of both stages."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import click

from duet_export.config import NEW_CONFIG_POSITIONS, POSITION_MODES, QUERY_MODES, DuetConfig
from duet_export.errors import DuetError
from duet_export.models.base import Adapter
from duet_export.stages.budget import resolve_budget

__all__ = ["budget_options", "config_from_options", "config_or_baseline", "parse_list"]


def parse_list(text: str | None, kind: type) -> tuple:
    """'16,24' or '[16, 24]' -> (16, 24); a one-line error on anything else."""
    if text is None:
        return ()
    body = text.strip().strip("[]()")
    if not body:
        return ()
    try:
        return tuple(kind(x) for x in body.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise DuetError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


def budget_options(func: Callable) -> Callable:
    """Add --budget / --dominant / --contextual / --cluster-width / --drop-layers / --keep-ratios / --query /
    --positions / --config."""
    options = [
        click.option(
            "--budget", type=float, help="Average visual tokens per decoder layer (resolved for this model)."
        ),
        click.option("--dominant", type=int, help="Stage 1: dominant tokens K_d (counts CLS)."),
        click.option("--contextual", type=int, help="Stage 1: contextual tokens K_c."),
        click.option(
            "--cluster-width", type=int, default=4, show_default=True, help="Stage 1: cluster width w."
        ),
        click.option("--drop-layers", help="Stage 2: decoder layers to drop before, e.g. 16,24."),
        click.option("--keep-ratios", help="Stage 2: kept fraction of V at each drop layer, e.g. 0.5,0.0."),
        click.option(
            "--query",
            type=click.Choice(QUERY_MODES),
            default="salient",
            show_default=True,
            help="Stage 2: which text tokens score the visual tokens.",
        ),
        click.option(
            "--positions",
            type=click.Choice(POSITION_MODES),
            help="Where kept visual tokens sit: keep (each at its place in the uncompressed prompt; the "
            "default for a --budget or the knobs; Qwen2.5-VL always keeps) or compact (renumbered after each "
            "reduction, the reference's LLaVA behaviour; a --config without the field). See docs/positions.md.",
        ),
        click.option(
            "--config", "config_file", type=click.Path(dir_okay=False), help="A DuetConfig JSON file."
        ),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(options), func)


def config_from_options(
    adapter: Adapter,
    *,
    budget: float | None,
    dominant: int | None,
    contextual: int | None,
    cluster_width: int,
    drop_layers: str | None,
    keep_ratios: str | None,
    query: str,
    config_file: str | None,
    positions: str | None = None,
    default_budget: float | None = None,
) -> DuetConfig:
    """One validated DuetConfig from whichever form the user gave; a one-line error when they conflict."""
    config = _config_from_options(
        adapter, budget=budget, dominant=dominant, contextual=contextual, cluster_width=cluster_width,
        drop_layers=drop_layers, keep_ratios=keep_ratios, query=query, config_file=config_file,
        default_budget=default_budget,
    )  # fmt: skip
    if positions is None and config_file is None:
        positions = NEW_CONFIG_POSITIONS  # a config made here; a file's own choice (or none) stands
    if positions is not None:
        if config.positions not in (None, positions):
            raise DuetError(
                f"--positions {positions} disagrees with the config's positions {config.positions!r}"
            )
        config = dataclasses.replace(config, positions=positions)
    adapter.position_mode(config)  # a choice the family cannot honour: say so now
    return config


def _config_from_options(
    adapter: Adapter,
    *,
    budget: float | None,
    dominant: int | None,
    contextual: int | None,
    cluster_width: int,
    drop_layers: str | None,
    keep_ratios: str | None,
    query: str,
    config_file: str | None,
    default_budget: float | None,
) -> DuetConfig:
    knobs = (
        dominant is not None or contextual is not None or drop_layers is not None or keep_ratios is not None
    )
    given = sum([budget is not None, knobs, config_file is not None])
    if given > 1:
        raise DuetError(
            "give --budget, the explicit knobs (--dominant ... --keep-ratios) or --config, not several"
        )
    geometry = adapter.geometry()
    if config_file is not None or knobs:
        if config_file is not None:
            config = _read_config_file(Path(config_file))
        else:
            config = DuetConfig(
                dominant=dominant,
                contextual=contextual or 0,
                cluster_width=cluster_width,
                drop_layers=parse_list(drop_layers, int),
                keep_ratios=parse_list(keep_ratios, float),
                query=query,
            )
        if not config.enabled:
            given = f"config {config_file}" if config_file is not None else "these options"
            raise DuetError(
                f"{given} leave both stages off (no dominant, no drop layers): for the uncompressed "
                "model use --no-compress"
            )
        return config.validate(geometry)
    if budget is None:
        budget = default_budget
    if budget is None:
        raise DuetError(
            "give --budget B or the explicit knobs (--dominant, --contextual, --drop-layers, --keep-ratios)"
        )
    return resolve_budget(budget, geometry, rules=adapter.rules, cluster_width=cluster_width, query=query)


def _read_config_file(path: Path) -> DuetConfig:
    """A DuetConfig JSON file: the config itself, or an object holding it under "config" (as written by
    `compress --save-config`)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DuetError(f"config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DuetError(f"cannot read config {path}: {e.__class__.__name__}") from None
    if isinstance(data, dict) and "config" in data:
        data = data["config"]
    try:
        return DuetConfig.from_dict(data)
    except DuetError as e:
        raise DuetError(f"config {path}: {e}") from None


def config_or_baseline(adapter: Adapter, no_compress: bool, **opts) -> DuetConfig | None:
    """The config the options ask for, or None for `--no-compress` (the uncompressed baseline)."""
    if no_compress:
        if opts.get("budget") is not None:
            raise DuetError("--no-compress and --budget exclude each other")
        # Nothing is removed, so every token is at its own place whatever the choice; still refuse one
        # the family cannot honour (Qwen2.5-VL and compact).
        adapter.position_mode(DuetConfig(positions=opts.get("positions")))
        return None
    return config_from_options(adapter, **opts)
