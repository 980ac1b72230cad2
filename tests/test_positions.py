"""`positions=keep` in PyTorch: every kept token at its place in the uncompressed prompt, in prefill (Stage 1
and every Stage-2 group) and decode, with KV cache, batches and left padding; `keep` with nothing removed is
the stock model; and the choice itself (config, JSON, API, families that cannot honour it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from duet_export import DuetConfig, compress, prepare_inputs
from duet_export.config import NEW_CONFIG_POSITIONS
from duet_export.errors import DuetError
from duet_export.forward import DuetTrace
from duet_export.stages.budget import resolve_budget

from conftest import PROMPTS, random_image
from loops import loop_decoder, loop_v2v, oracle_model

BOTH = DuetConfig(dominant=20, contextual=6, drop_layers=(4, 6), keep_ratios=(0.5, 0.25), positions="keep")


def stock_logits(model, inputs):
    """The stock forward with the positions `generate()` would give it (padding-aware)."""
    mask = inputs["attention_mask"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        return model(**inputs, position_ids=pos).logits


def record_positions(model) -> list[torch.Tensor]:
    """Every position tensor the compressed forward hands to the rotary embedding, in call order."""
    adapter = model.forward.adapter
    seen: list[torch.Tensor] = []
    rotary = adapter.rotary

    def recording(hidden, position_ids):
        seen.append(position_ids.clone())
        return rotary(hidden, position_ids)

    adapter.rotary = recording
    return seen


def uncompressed_places(loaded, images, prompts):
    """Per row: (positions of the text tokens, positions of the image's N placeholders) in the uncompressed
    prompt, as `generate()` numbers them (real tokens only), and the prompt's real length."""
    full = prepare_inputs(loaded.processor, loaded.adapter, images, prompts)
    mask = full["attention_mask"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    image = full["input_ids"] == loaded.adapter.image_token_id
    rows = []
    for b in range(len(prompts)):
        real = mask[b].bool()
        rows.append((pos[b][real & ~image[b]].tolist(), pos[b][image[b]].tolist(), int(real.sum())))
    return rows


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(DuetConfig(positions="keep"), id="off"),
        pytest.param(DuetConfig(drop_layers=(2, 5), keep_ratios=(1.0, 1.0), positions="keep"), id="keep-all"),
    ],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_keep_with_nothing_removed_is_the_stock_model(tiny, images, prompts, config, batch):
    inputs = prepare_inputs(tiny.processor, tiny.adapter, images[:batch], prompts[:batch])
    ref = stock_logits(tiny.model, inputs)
    with torch.no_grad():
        ref_tokens = tiny.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    compress(tiny.model, config)
    assert tiny.model.forward.keep
    with torch.no_grad():
        out = tiny.model(**inputs).logits
        tokens = tiny.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-6, rtol=1e-6)
    assert torch.equal(tokens, ref_tokens)


def test_kept_tokens_keep_their_places_in_prefill_and_decode(tiny, images, prompts):
    places = uncompressed_places(tiny, images, prompts)
    compress(tiny.model, BOTH)
    inputs = prepare_inputs(tiny.processor, tiny.adapter, images, prompts, BOTH)
    assert not bool(inputs["attention_mask"].all())  # left padding
    seen = record_positions(tiny.model)
    trace = DuetTrace()
    new_tokens = 4
    with torch.no_grad():
        tiny.model.generate(**inputs, duet_trace=trace, max_new_tokens=new_tokens, do_sample=False)
    groups = len(BOTH.drop_layers) + 1
    prefill = [p for p in seen if p.shape[-1] > 1]
    assert len(prefill) == groups + len(BOTH.drop_layers)  # one per group, one per drop's scoring
    image = tiny.adapter.image_token_id
    for b, (text, patches, _) in enumerate(places):
        real = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b][real]
        ours = prefill[0][b][real]
        assert ours[ids != image].tolist() == text, f"row {b}: text moved"
        s1 = trace.stage1
        expected = [patches[0]] + [patches[int(p)] for p in [*s1.dominant[b], *s1.anchors[b]]]
        assert ours[ids == image].tolist() == expected, (
            f"row {b}: a Stage-1 token is not at its patch's place"
        )
    previous = prefill[0]
    for layer, later in zip(BOTH.drop_layers, prefill[2::2], strict=True):  # group, scoring, group, ...
        assert torch.equal(later, torch.gather(previous, 1, trace.keep_index[layer])), f"drop at {layer}"
        previous = later
    decode = [p for p in seen if p.shape[-1] == 1]
    assert len(decode) == groups * (new_tokens - 1)
    for step in range(new_tokens - 1):
        for g in range(groups):
            assert decode[step * groups + g][:, 0].tolist() == [length + step for *_, length in places]


def test_compact_renumbers_where_keep_does_not(tiny, images, prompts):
    """The same config with `compact` (the default) hands the decoder other positions: the choice is real."""
    compact = dataclasses.replace(BOTH, positions=None)
    inputs = prepare_inputs(tiny.processor, tiny.adapter, images, prompts, compact)
    logits = {}
    for config in (compact, BOTH):
        compress(tiny.model, config)
        seen = record_positions(tiny.model)
        with torch.no_grad():
            logits[config.positions] = tiny.model(**inputs, use_cache=False).logits
        first = seen[0]
        mask = inputs["attention_mask"]
        renumbered = torch.equal(first, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))
        assert renumbered == (config.positions is None)
    assert not torch.allclose(logits[None], logits["keep"])


def test_keep_matches_a_loop_over_the_stock_decoder(tiny, tiny_dir, images, prompts):
    """Kept indices and logits against `loop_decoder` on the stock decoder: the loop's Stage-1 tokens at
    the places their patches have in the uncompressed prompt, kept through each drop."""
    compress(tiny.model, BOTH)
    batch = prepare_inputs(tiny.processor, tiny.adapter, images, prompts, BOTH)
    trace = DuetTrace()
    with torch.no_grad():
        logits = tiny.model(**batch, duet_trace=trace, use_cache=False).logits
    oracle = oracle_model(tiny_dir)
    adapter = tiny.adapter
    v = BOTH.dominant + BOTH.contextual
    schedule = {layer: int(r * v + 1e-9) for layer, r in zip(BOTH.drop_layers, BOTH.keep_ratios, strict=True)}
    for i, (text, patches, _) in enumerate(uncompressed_places(tiny, images, prompts)):
        single = prepare_inputs(tiny.processor, adapter, images[i : i + 1], prompts[i : i + 1], BOTH)
        ids, salient = single["input_ids"][0], single["duet_query_mask"][0]
        with torch.no_grad():
            out = adapter.vision_layer(single["pixel_values"], need_scores=True)
            tokens, dom, anchors, *_ = loop_v2v(
                out.hidden[0], out.cls_attention[0], out.keys[0], BOTH.dominant, BOTH.contextual, 4
            )
            visual = ids == adapter.image_token_id
            embeds = oracle.model.language_model.embed_tokens(ids).clone()
            embeds[visual] = adapter.project(tokens.unsqueeze(0))[0]
            positions = torch.zeros(len(ids), dtype=torch.long)
            positions[~visual] = torch.tensor(text)
            positions[visual] = torch.tensor([patches[0]] + [patches[p] for p in [*dom, *anchors]])
            kept, ref_logits, _ = loop_decoder(
                oracle, embeds, positions, visual, salient, schedule, BOTH.query, recompact=False
            )
        for layer, indices in kept.items():
            assert trace.stage2[layer][i].tolist() == indices, f"sample {i} layer {layer}"
        torch.testing.assert_close(logits[i][-ref_logits.shape[0] :], ref_logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(BOTH, id="both"),
        pytest.param(DuetConfig(drop_layers=(3,), keep_ratios=(0.3,), positions="keep"), id="stage2"),
        pytest.param(DuetConfig(dominant=16, contextual=4, positions="keep"), id="stage1"),
    ],
)
def test_keep_gives_the_same_tokens_with_and_without_kv_cache(tiny, images, prompts, config):
    compress(tiny.model, config)
    inputs = prepare_inputs(tiny.processor, tiny.adapter, images, prompts, config)
    with torch.no_grad():
        cached = tiny.model.generate(**inputs, max_new_tokens=16, do_sample=False)
        uncached = tiny.model.generate(**inputs, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_the_choice_is_a_config_field_and_an_api_argument(tiny):
    geometry = tiny.adapter.geometry()
    assert DuetConfig().positions is None and "positions" not in DuetConfig().to_dict()  # older JSON
    assert DuetConfig.from_dict(BOTH.to_dict()) == BOTH
    with pytest.raises(DuetError, match='must be "compact", "keep" or null'):
        DuetConfig.from_dict({"positions": "sideways"})
    with pytest.raises(DuetError, match="positions must be one of compact, keep"):
        DuetConfig(positions="sideways").validate(geometry)
    compress(tiny.model, budget=21, positions="keep")
    assert tiny.model.forward.config.positions == "keep" and tiny.model.forward.keep
    assert resolve_budget(21, geometry).positions is None  # names none: the family's reference, compact
    compress(tiny.model, resolve_budget(21, geometry))
    assert not tiny.model.forward.keep
    compress(tiny.model, budget=21)  # a config made for the user: the new configs' default
    assert tiny.model.forward.config.positions == NEW_CONFIG_POSITIONS == "keep" and tiny.model.forward.keep
    compress(tiny.model, budget=21, positions="compact")
    assert not tiny.model.forward.keep


def test_keep_takes_one_image_per_prompt(tiny):
    """A decode step could not tell how many uncompressed image tokens came before it: refused plainly."""
    compress(tiny.model, BOTH)
    one = prepare_inputs(tiny.processor, tiny.adapter, [random_image(1)], PROMPTS[:1], BOTH)
    ids, image = one["input_ids"], tiny.adapter.image_token_id
    first = int((ids[0] == image).nonzero()[0])
    v = BOTH.dominant + BOTH.contextual
    two = {
        "input_ids": torch.cat([ids[:, :first], torch.full((1, v), image), ids[:, first:]], dim=1),
        "pixel_values": one["pixel_values"].repeat(2, 1, 1, 1),
    }
    with pytest.raises(DuetError, match="one image"), torch.no_grad():
        tiny.model(**two)
    compress(tiny.model, dataclasses.replace(BOTH, positions="compact"))
    with torch.no_grad():
        tiny.model(**two)  # compact positions take it
