import math
from fractions import Fraction

import pytest

from duet_export.config import DuetConfig, Geometry, keep_count
from duet_export.errors import DuetError
from duet_export.stages.budget import VIDEO_LLAVA_RULES, report, resolve_budget

LLAVA = Geometry(num_patches=576, num_layers=32)


def test_reference_192_setting():
    cfg = resolve_budget(192, LLAVA)
    assert (cfg.dominant, cfg.contextual) == (300, 7)
    assert cfg.visual_tokens(LLAVA) == 307
    assert cfg.drop_layers == (16, 24)
    assert cfg.keep_ratios == (0.5, 0.0)
    rep = report(cfg, LLAVA)
    assert rep.group_tokens == [307, 153, 0]
    assert rep.average_tokens == pytest.approx((307 * 16 + 153 * 8) / 32)
    assert rep.reduction == pytest.approx(1 - 191.75 / 576)


def test_reference_128_and_64_settings():
    cfg128 = resolve_budget(128, LLAVA)
    assert (cfg128.dominant, cfg128.contextual) == (170, 35)
    cfg64 = resolve_budget(64, LLAVA)
    rep = report(cfg64, LLAVA)
    assert rep.average_tokens <= 64
    assert rep.reduction == pytest.approx(0.889, abs=0.002)


@pytest.mark.parametrize("budget", [1, 7.5, 50, 100, 192, 250, 300, 359])
def test_budget_never_exceeded_and_tight(budget):
    cfg = resolve_budget(budget, LLAVA)
    avg = cfg.average_tokens(LLAVA)
    assert avg <= budget
    # one more visual token would exceed the budget (the resolver takes the largest V that fits)
    if cfg.stage1:
        bigger = DuetConfig(
            dominant=cfg.dominant + 1,
            contextual=cfg.contextual,
            drop_layers=cfg.drop_layers,
            keep_ratios=cfg.keep_ratios,
        )
        assert bigger.average_tokens(LLAVA) > budget


def test_full_budget_is_identity_and_large_budgets_cap():
    assert not resolve_budget(576, LLAVA).enabled
    cfg = resolve_budget(500, LLAVA)
    assert not cfg.stage1 and cfg.stage2  # above ~62 % of N Stage 1 is off and the schedule caps the average
    assert cfg.average_tokens(LLAVA) == pytest.approx(360)


VIDEO_LLAVA_7B = Geometry(num_patches=256, num_layers=32, frames=8)


def test_video_llava_adapter_supplies_the_video_rules():
    from duet_export.models.video_llava import VideoLlavaAdapter

    assert VideoLlavaAdapter.rules is VIDEO_LLAVA_RULES


def test_paper_video_960_setting():
    """The reference's clip setting: 160 + 32 per frame, drops [16, 24] / [0.5, 0.0], average 960."""
    cfg = resolve_budget(960, VIDEO_LLAVA_7B, rules=VIDEO_LLAVA_RULES)
    assert (cfg.dominant, cfg.contextual) == (160, 32)
    assert (cfg.drop_layers, cfg.keep_ratios) == ((16, 24), (0.5, 0.0))
    rep = report(cfg, VIDEO_LLAVA_7B)
    assert rep.visual_tokens == 8 * 192 and rep.group_tokens == [1536, 768, 0]
    assert rep.average_tokens == 960 and round(100 * rep.reduction, 1) == 53.1
    # The image rules give this budget almost no contextual tokens (188 + 4), not the paper's split.
    image = resolve_budget(960, VIDEO_LLAVA_7B)
    assert (image.dominant, image.contextual) == (188, 4)


def test_paper_video_136_setting():
    """136 is out of reach (average 0.625 V, V a multiple of 8 frames): 216 = 8 x (23 + 4) averages 135."""
    cfg = resolve_budget(136, VIDEO_LLAVA_7B, rules=VIDEO_LLAVA_RULES)
    assert (cfg.dominant, cfg.contextual) == (23, 4)  # 27 x 32/192 = 4.5 contextual, rounded to even
    assert (cfg.drop_layers, cfg.keep_ratios) == ((16, 24), (0.5, 0.0))
    rep = report(cfg, VIDEO_LLAVA_7B)
    assert rep.visual_tokens == 216 and rep.group_tokens == [216, 108, 0]
    assert rep.average_tokens == 135 and round(100 * rep.reduction, 1) == 93.4
    # one more token per frame (V = 224) would average 140
    assert (
        DuetConfig(24, 4, drop_layers=(16, 24), keep_ratios=(0.5, 0.0)).average_tokens(VIDEO_LLAVA_7B) == 140
    )


# Ratios whose float product with some counts lands a hair below the integer it stands for:
# 0.7 * 90 = 62.99999999999999, 0.29 * 100 = 28.999999999999996, 0.58 * 50 = 28.999999999999996.
SHORT_PRODUCTS = [(0.7, 90, 63), (0.7, 170, 119), (0.29, 100, 29), (0.58, 50, 29), (0.35, 180, 63)]


@pytest.mark.parametrize(("ratio", "visual", "kept"), SHORT_PRODUCTS)
def test_keep_count_is_the_floor_of_the_ratio_as_written(ratio, visual, kept):
    """floor(r * V) of the decimal ratio the user wrote, not of its binary float (the 1e-9 guard)."""
    assert math.floor(ratio * visual) == kept - 1  # the case the guard exists for
    assert keep_count(ratio, visual) == kept
    geometry = Geometry(num_patches=visual, num_layers=32)
    cfg = DuetConfig(drop_layers=(16,), keep_ratios=(ratio,))
    assert cfg.group_visual_tokens(geometry) == [visual, kept]


def test_keep_count_matches_exact_arithmetic_on_every_count():
    ratios = (0.1, 0.125, 0.25, 0.29, 0.3, 0.35, 0.5, 0.57, 0.58, 0.7, 0.75, 0.9, 1.0)
    for ratio in ratios:
        exact = Fraction(str(ratio))
        for visual in range(0, 2049):
            assert keep_count(ratio, visual) == math.floor(exact * visual), (ratio, visual)


@pytest.mark.parametrize(
    ("budget", "message"),
    [(577, "larger than the 576"), (0, "must be positive"), (0.1, "too small")],
)
def test_bad_budgets(budget, message):
    with pytest.raises(DuetError, match=message):
        resolve_budget(budget, LLAVA)


def test_shallow_decoder_needs_explicit_schedule():
    with pytest.raises(DuetError, match="too shallow"):
        resolve_budget(10, Geometry(num_patches=64, num_layers=2))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DuetConfig(drop_layers=(24, 16), keep_ratios=(0.5, 0.0)), "strictly increasing"),
        (DuetConfig(drop_layers=(16, 16), keep_ratios=(0.5, 0.0)), "strictly increasing"),
        (DuetConfig(drop_layers=(0, 16), keep_ratios=(0.5, 0.0)), "out of range"),
        (DuetConfig(drop_layers=(16, 32), keep_ratios=(0.5, 0.0)), "out of range"),
        (DuetConfig(drop_layers=(16, 24), keep_ratios=(0.2, 0.5)), "non-increasing"),
        (DuetConfig(drop_layers=(16,), keep_ratios=(0.5, 0.2)), "one ratio per layer"),
        (DuetConfig(drop_layers=(16,), keep_ratios=(1.5,)), r"\[0, 1\]"),
        (DuetConfig(dominant=578), "only 576"),
        (DuetConfig(dominant=500, contextual=100), "exceeds the 77 patches"),
        (DuetConfig(dominant=0), ">= 1"),
        (DuetConfig(dominant=10, contextual=2, cluster_width=0), "cluster width"),
        (DuetConfig(query="first"), "query must be"),
        (DuetConfig(contextual=3), "need Stage 1"),
    ],
)
def test_config_validation(cfg, message):
    with pytest.raises(DuetError, match=message):
        cfg.validate(LLAVA)


def test_config_round_trip():
    cfg = resolve_budget(64, LLAVA)
    assert DuetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DuetError, match="unknown"):
        DuetConfig.from_dict({"dominat": 3})
