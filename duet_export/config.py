"""`DuetConfig`: the knobs of both DUET stages, and what they cost in visual tokens.

Stage 1 (V2V merge) is described by `dominant` (K_d, counting the CLS token), `contextual` (K_c) and
`cluster_width` (w). Stage 2 (T2V drop) by `drop_layers` (0-based decoder layer indices, strictly increasing)
and `keep_ratios` (fractions of the visual tokens that entered the decoder, non-increasing). `query` chooses
which text tokens score the visual tokens in Stage 2. `positions` says where the kept tokens sit: `compact`
renumbers them 0..len-1 after every reduction (the reference's LLaVA behaviour), `keep` leaves every kept token
at the place it has in the uncompressed prompt (docs/positions.md); None is the family's own default. See
ALGORITHM.md for the exact behaviour.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from duet_export.errors import DuetError

__all__ = ["NEW_CONFIG_POSITIONS", "POSITION_MODES", "QUERY_MODES", "DuetConfig", "Geometry", "keep_count"]

QUERY_MODES = ("salient", "all", "last")
POSITION_MODES = ("compact", "keep")
# What the configs the tool makes for a user take when the user names no `positions` (a --budget or the knobs
# on the command line, `compress(model, budget=B)`, demo, bench): "keep" won every DUET row of both accuracy
# tables (docs/positions.md, "The default"). A config that names none (`positions=None`: every config written
# before the choice existed, or one built in code) keeps meaning the family's reference behaviour, "compact"
# for LLaVA and Video-LLaVA.
NEW_CONFIG_POSITIONS = "keep"


def keep_count(ratio: float, visual_tokens: int) -> int:
    """Tokens kept by a Stage-2 ratio: floor(r * V), as the reference's `int(V * r)`.

    The small epsilon keeps 0.29 * 100 at 29 instead of 28.999999999999996.
    """
    return math.floor(ratio * visual_tokens + 1e-9)


@dataclass(frozen=True)
class Geometry:
    """What a budget is measured against: patches per image (N), images per visual block, decoder layers (L).

    `frames` is 1 for an image and the number of frames for a video clip; Stage 1 runs per frame.
    `has_cls` is False for encoders without a CLS token (Qwen2.5-VL): there `dominant` counts patches only.
    """

    num_patches: int
    num_layers: int
    frames: int = 1
    has_cls: bool = True

    @property
    def total_patches(self) -> int:
        return self.num_patches * self.frames


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


_FIELD_TYPES = {
    "dominant": ("an integer or null", lambda x: x is None or _is_int(x)),
    "contextual": ("an integer", _is_int),
    "cluster_width": ("an integer", _is_int),
    "drop_layers": ("a list of integers", lambda x: isinstance(x, list) and all(map(_is_int, x))),
    "keep_ratios": ("a list of numbers", lambda x: isinstance(x, list) and all(map(_is_number, x))),
    "query": ("a string", lambda x: isinstance(x, str)),
    "positions": ('"compact", "keep" or null', lambda x: x is None or x in POSITION_MODES),
}


@dataclass(frozen=True)
class DuetConfig:
    """Both stages' parameters. `dominant=None` turns Stage 1 off; empty `drop_layers` turns Stage 2 off."""

    dominant: int | None = None
    contextual: int = 0
    cluster_width: int = 4
    drop_layers: tuple[int, ...] = field(default_factory=tuple)
    keep_ratios: tuple[float, ...] = field(default_factory=tuple)
    query: str = "salient"
    positions: str | None = None  # "compact" | "keep" | None (the family's reference behaviour)

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop_layers", tuple(int(x) for x in self.drop_layers))
        object.__setattr__(self, "keep_ratios", tuple(float(x) for x in self.keep_ratios))

    # ----------------------------------------------------------------------------------------- queries
    @property
    def stage1(self) -> bool:
        return self.dominant is not None

    @property
    def stage2(self) -> bool:
        return len(self.drop_layers) > 0

    @property
    def enabled(self) -> bool:
        return self.stage1 or self.stage2

    def tokens_per_frame(self, num_patches: int) -> int:
        """Visual tokens one image/frame contributes to the decoder (N when Stage 1 is off)."""
        return self.dominant + self.contextual if self.stage1 else num_patches

    def visual_tokens(self, geometry: Geometry) -> int:
        """V: visual tokens entering the decoder for one visual block."""
        return self.tokens_per_frame(geometry.num_patches) * geometry.frames

    def group_bounds(self, num_layers: int) -> list[tuple[int, int]]:
        """Decoder layer groups [start, end): layers in one group share a sequence (and KV) length."""
        edges = [0, *self.drop_layers, num_layers]
        return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    def group_visual_tokens(self, geometry: Geometry) -> list[int]:
        """Visual tokens present in each layer group: V, then floor(r_i * V) after each drop."""
        v = self.visual_tokens(geometry)
        return [v] + [keep_count(r, v) for r in self.keep_ratios]

    def tokens_per_layer(self, geometry: Geometry) -> list[int]:
        counts = self.group_visual_tokens(geometry)
        out: list[int] = []
        for (start, end), count in zip(self.group_bounds(geometry.num_layers), counts, strict=True):
            out.extend([count] * (end - start))
        return out

    def average_tokens(self, geometry: Geometry) -> float:
        """The paper's "average tokens": mean visual tokens seen per decoder layer."""
        per_layer = self.tokens_per_layer(geometry)
        return sum(per_layer) / len(per_layer)

    def reduction(self, geometry: Geometry) -> float:
        """Fraction of visual tokens saved against the uncompressed model (N per frame in every layer)."""
        return 1.0 - self.average_tokens(geometry) / geometry.total_patches

    # ------------------------------------------------------------------------------------- validation
    def validate(self, geometry: Geometry) -> DuetConfig:
        """Check the config against a model's geometry; raise `DuetError` with one line on the first problem."""
        n, num_layers = geometry.num_patches, geometry.num_layers
        if self.query not in QUERY_MODES:
            raise DuetError(f"query must be one of {', '.join(QUERY_MODES)}, got {self.query!r}")
        if self.positions is not None and self.positions not in POSITION_MODES:
            raise DuetError(f"positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        if self.cluster_width < 1:
            raise DuetError(f"cluster width must be >= 1, got {self.cluster_width}")
        if self.stage1:
            cls = 1 if geometry.has_cls else 0
            if self.dominant < 1:
                why = " (it counts the CLS token)" if cls else ""
                raise DuetError(f"dominant must be >= 1{why}, got {self.dominant}")
            if self.dominant - cls > n:
                raise DuetError(
                    f"dominant={self.dominant} asks for {self.dominant - cls} patches but the model has only {n} per image"
                )
            if self.contextual < 0:
                raise DuetError(f"contextual must be >= 0, got {self.contextual}")
            remaining = n - (self.dominant - cls)
            if self.contextual > remaining:
                raise DuetError(
                    f"contextual={self.contextual} exceeds the {remaining} patches left after "
                    f"{self.dominant - cls} dominant ones (N={n})"
                )
        elif self.contextual:
            raise DuetError("contextual tokens need Stage 1: give dominant too")
        if len(self.drop_layers) != len(self.keep_ratios):
            raise DuetError(
                f"{len(self.drop_layers)} drop layers but {len(self.keep_ratios)} keep ratios: give one ratio per layer"
            )
        if list(self.drop_layers) != sorted(set(self.drop_layers)):
            raise DuetError(f"drop layers must be strictly increasing, got {list(self.drop_layers)}")
        for layer in self.drop_layers:
            if not 1 <= layer <= num_layers - 1:
                raise DuetError(
                    f"drop layer {layer} is out of range: the decoder has {num_layers} layers (use 1..{num_layers - 1})"
                )
        for r in self.keep_ratios:
            if not 0.0 <= r <= 1.0:
                raise DuetError(f"keep ratios must lie in [0, 1], got {r}")
        if any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:])):
            raise DuetError(f"keep ratios must be non-increasing, got {list(self.keep_ratios)}")
        return self

    # ---------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["drop_layers"] = list(self.drop_layers)
        d["keep_ratios"] = list(self.keep_ratios)
        if self.positions is None:  # the family's default: written as older configs were
            del d["positions"]
        return d

    @classmethod
    def from_dict(cls, d: object) -> DuetConfig:
        """A config from its JSON form; fields of the wrong type are one-line errors, not crashes later."""
        if not isinstance(d, dict):
            raise DuetError(f"a DuetConfig is a JSON object, not {json.dumps(d)[:60]}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise DuetError(f"unknown DuetConfig fields: {', '.join(sorted(unknown))}")
        for name, value in d.items():
            kind, ok = _FIELD_TYPES[name]
            if not ok(value):
                raise DuetError(f"DuetConfig field {name!r} must be {kind}, got {json.dumps(value)}")
        return cls(**d)

    def describe(self) -> str:
        s1 = (
            f"V2V dominant={self.dominant} contextual={self.contextual} w={self.cluster_width}"
            if self.stage1
            else "V2V off"
        )
        s2 = (
            f"T2V drop at {list(self.drop_layers)} keep {list(self.keep_ratios)} query={self.query}"
            if self.stage2
            else "T2V off"
        )
        return f"{s1}; {s2}" + (f"; positions={self.positions}" if self.positions else "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
