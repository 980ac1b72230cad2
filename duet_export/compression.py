"""Turn DUET compression on and off for a loaded model instance.

`compress(model, config)` installs a `DuetForward` as that instance's `forward` (nothing global is
patched: other models in the process are untouched); `decompress(model)` removes it, restoring the stock
forward. The model's weights are never modified.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from duet_export.config import NEW_CONFIG_POSITIONS, DuetConfig
from duet_export.errors import DuetError
from duet_export.forward import DuetForward
from duet_export.models import adapter_for
from duet_export.stages.budget import resolve_budget

__all__ = ["compress", "decompress", "duet_config_of", "is_compressed"]


def compress(
    model: nn.Module,
    config: DuetConfig | None = None,
    *,
    budget: float | None = None,
    query: str = "salient",
    positions: str | None = None,
) -> nn.Module:
    """Compress `model` in place with `config`, or with the config resolved from `budget`; returns `model`.

    `positions` ("compact" | "keep") overrides the config's choice (None: the config's, else the family's
    reference behaviour; with `budget`, NEW_CONFIG_POSITIONS)."""
    if (config is None) == (budget is None):
        raise DuetError("give either a DuetConfig or a budget")
    adapter = adapter_for(model)
    if config is None:  # a config made here: the new configs' default unless `positions` names one
        config = resolve_budget(budget, adapter.geometry(), rules=adapter.rules, query=query)
        positions = positions or NEW_CONFIG_POSITIONS
    if positions is not None:
        config = dataclasses.replace(config, positions=positions).validate(adapter.geometry())
    decompress(model)
    model.forward = DuetForward(model, adapter, config)
    return model


def decompress(model: nn.Module) -> nn.Module:
    """Remove compression from `model` (a no-op if it was not compressed); returns `model`."""
    if is_compressed(model):
        del model.forward
    return model


def is_compressed(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("forward"), DuetForward)


def duet_config_of(model: nn.Module) -> DuetConfig | None:
    fwd = model.__dict__.get("forward")
    return fwd.config if isinstance(fwd, DuetForward) else None
