"""Budgets: turn "B average visual tokens per decoder layer" into a `DuetConfig` for a model's own N and L.

The rules follow the reference settings of DUET-VLM on LLaVA-1.5-7B (N = 576, L = 32):

1. Stage 2 keeps the reference schedule, scaled to the model's depth: drop before layers
   floor(0.5 L + 0.5) and floor(0.75 L + 0.5) (= [16, 24] at L = 32) with keep ratios [0.5, 0.0].
2. V, the visual tokens Stage 1 hands to the decoder, is the largest count (a multiple of the frame count)
   whose average over the decoder layers does not exceed B. When that count reaches N per frame, Stage 1 is
   turned off (all patches enter the decoder), so budgets above ~62 % of N stop short of B: the report says
   what was achieved.
3. V is split into dominant (K_d, CLS included) and contextual (K_c) tokens by the reference's contextual
   share, interpolated linearly in B/N between its anchors and held constant outside them. For LLaVA-1.5
   the anchors are the paper's 192-token setting (300 + 7 of V = 307) and the 128-token setting of the
   reference README (170 + 35 of V = 205); so 64 resolves to 85 + 17 of V = 102.
4. B = N (every token) resolves to compression off; B > N or a budget no V can meet is an error.

Video (Video-LLaVA, `VIDEO_LLAVA_RULES`): the same schedule, and the contextual share of the reference's one
video setting, 160 + 32 per frame (32/192 of V), held at every budget; its scripts use no other. On
Video-LLaVA-7B geometry (8 frames x 256 patches, L = 32), where the average is 0.625 V:

- 960 resolves to 160 + 32 per frame, drops [16, 24] keeping [0.5, 0.0]: V = 1536, average exactly 960.
- 136 (the paper's 93.4 % setting) resolves to 23 + 4 per frame with the same drops: V = 216, average 135.
  No V averages exactly 136 (that needs V = 217.6, and V is a multiple of the 8 frames); 216 is the largest
  that fits (224 averages 140). Its contextual count is 27 x 32/192 = 4.5, which `round` takes to 4. The
  reference publishes no Stage-1 setting of its own for 136.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from duet_export.config import DuetConfig, Geometry
from duet_export.errors import DuetError

__all__ = ["LLAVA_RULES", "VIDEO_LLAVA_RULES", "BudgetReport", "ReferenceRules", "report", "resolve_budget"]


@dataclass(frozen=True)
class ReferenceRules:
    """The reference schedule a budget is resolved against (see the module docstring)."""

    drop_fractions: tuple[float, ...] = (0.5, 0.75)
    keep_ratios: tuple[float, ...] = (0.5, 0.0)
    # (B / N, K_c / V) pairs, ascending in B / N.
    contextual_anchors: tuple[tuple[float, float], ...] = field(
        default_factory=lambda: ((128 / 576, 35 / 205), (192 / 576, 7 / 307))
    )

    def drop_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = tuple(math.floor(f * num_layers + 0.5) for f in self.drop_fractions)
        if len(set(layers)) != len(layers) or min(layers) < 1 or max(layers) > num_layers - 1:
            raise DuetError(
                f"a {num_layers}-layer decoder is too shallow for the reference drop schedule; "
                "give --drop-layers and --keep-ratios explicitly"
            )
        return layers

    def contextual_share(self, budget_fraction: float) -> float:
        anchors = self.contextual_anchors
        if budget_fraction <= anchors[0][0]:
            return anchors[0][1]
        if budget_fraction >= anchors[-1][0]:
            return anchors[-1][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(anchors):
            if x0 <= budget_fraction <= x1:
                return y0 + (y1 - y0) * (budget_fraction - x0) / (x1 - x0)
        raise AssertionError("anchors must be sorted")  # pragma: no cover


LLAVA_RULES = ReferenceRules()
# Video-LLaVA: the reference's clip setting (AMD-AGI/DUET-VLM scripts/videollava: dominant 160, contextual 32,
# layers [16, 24], ratios [0.5, 0.0]), average 960 of 2048; one anchor, so its share holds at every budget.
VIDEO_LLAVA_RULES = ReferenceRules(contextual_anchors=((960 / 2048, 32 / 192),))


def _config_for(
    per_frame: int, geometry: Geometry, rules: ReferenceRules, budget: float, cw: int, query: str
):
    layers = rules.drop_layers(geometry.num_layers)
    if per_frame >= geometry.num_patches:
        return DuetConfig(drop_layers=layers, keep_ratios=rules.keep_ratios, cluster_width=cw, query=query)
    share = rules.contextual_share(budget / geometry.total_patches)
    contextual = min(round(share * per_frame), per_frame - 1)
    return DuetConfig(
        dominant=per_frame - contextual,
        contextual=contextual,
        cluster_width=cw,
        drop_layers=layers,
        keep_ratios=rules.keep_ratios,
        query=query,
    )


def resolve_budget(
    budget: float,
    geometry: Geometry,
    *,
    rules: ReferenceRules = LLAVA_RULES,
    cluster_width: int = 4,
    query: str = "salient",
) -> DuetConfig:
    """Resolve an average-visual-tokens budget into a validated `DuetConfig` (rules in the module docstring)."""
    total = geometry.total_patches
    if not budget > 0:
        raise DuetError(f"budget must be positive, got {budget:g}")
    if budget > total:
        raise DuetError(f"budget {budget:g} is larger than the {total} visual tokens the model has")
    if budget == total:
        return DuetConfig(cluster_width=cluster_width, query=query)
    for per_frame in range(geometry.num_patches, 0, -1):
        cfg = _config_for(per_frame, geometry, rules, budget, cluster_width, query)
        if cfg.average_tokens(geometry) <= budget + 1e-9:
            return cfg.validate(geometry)
    raise DuetError(f"budget {budget:g} is too small: even one visual token per frame averages more")


@dataclass(frozen=True)
class BudgetReport:
    """What a config costs on a geometry: the numbers `inspect`, `export` and `bench` print."""

    config: DuetConfig
    geometry: Geometry
    visual_tokens: int
    group_tokens: list[int]
    average_tokens: float
    reduction: float

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "num_patches": self.geometry.num_patches,
            "frames": self.geometry.frames,
            "num_layers": self.geometry.num_layers,
            "visual_tokens": self.visual_tokens,
            "group_visual_tokens": self.group_tokens,
            "layer_groups": [list(g) for g in self.config.group_bounds(self.geometry.num_layers)],
            "average_tokens": round(self.average_tokens, 4),
            "reduction": round(self.reduction, 6),
        }

    def summary(self) -> str:
        return (
            f"{self.config.describe()} | V={self.visual_tokens} of {self.geometry.total_patches}, "
            f"average {self.average_tokens:.2f} tokens/layer ({100 * self.reduction:.1f} % fewer)"
        )


def report(config: DuetConfig, geometry: Geometry) -> BudgetReport:
    config.validate(geometry)
    return BudgetReport(
        config=config,
        geometry=geometry,
        visual_tokens=config.visual_tokens(geometry),
        group_tokens=config.group_visual_tokens(geometry),
        average_tokens=config.average_tokens(geometry),
        reduction=config.reduction(geometry),
    )
