"""Qwen2.5-VL: a tiny checkpoint saved and loaded like Qwen/Qwen2.5-VL-*-Instruct, checked against stock
transformers (vision tower, generate, M-RoPE positions from `get_rope_index`) with and without DUET."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from duet_export import DuetConfig, GenerationSettings, compress, prepare_inputs
from duet_export.data.records import TrainingExample
from duet_export.errors import DuetError
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.forward import DuetTrace
from duet_export.loading import load
from duet_export.models.qwen2_5_vl import Qwen2_5_VLAdapter, fixed_resolution
from duet_export.runtimes import OnnxVLM
from duet_export.stages.budget import resolve_budget
from duet_export.tiny import TinyQwenSpec, build_tiny_qwen2_5_vl

from conftest import NEW_TOKENS, PROMPTS, check_conversation_batch, random_image, reference_generate
from loops import loop_decoder, oracle_model, stock_qwen_stage1

N = 64  # 224 x 224 px: 16 x 16 patches of 14, 8 x 8 merged tokens


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl", TinyQwenSpec())


@pytest.fixture(scope="module")
def qwen_bundle(qwen_dir, tmp_path_factory):
    loaded = load(qwen_dir)
    out = tmp_path_factory.mktemp("bundles") / "qwen"
    export_bundle(
        loaded, out, budget_config(loaded), ExportOptions("cpu", 32, NEW_TOKENS, 2), echo=lambda m: None
    )
    return out


def images():
    return [random_image(1), random_image(2, size=80)]  # neither is 224 x 224: the processor resizes


def budget_config(loaded):
    """~67 % fewer visual tokens on average, as the paper's 192 of 576."""
    return resolve_budget(21, loaded.adapter.geometry(), rules=loaded.adapter.rules)


def stock_positions(loaded, inputs):
    """[3, B, T] M-RoPE positions of the uncompressed prompt, from transformers' own `get_rope_index`."""
    positions, _ = loaded.model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    return positions


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


def test_loads_through_the_loader_with_a_fixed_resolution(qwen_dir):
    loaded = load(qwen_dir)
    assert isinstance(loaded.adapter, Qwen2_5_VLAdapter)
    assert type(loaded.processor).__name__ == "ImageOnlyQwen2_5_VLProcessor"
    geometry = loaded.adapter.geometry()
    assert (geometry.num_patches, geometry.num_layers, geometry.has_cls) == (N, 8, False)
    assert loaded.adapter.image_size == (224, 224)  # pinned by the image processor (min = max pixels)
    assert loaded.model.duet_image_size == (224, 224)  # recorded for later adapters
    assert loaded.processor.duet_image_size == (224, 224)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS)
    assert inputs["pixel_values"].shape == (2 * 256, 1176)
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]] * 2
    assert (inputs["input_ids"] == loaded.adapter.image_token_id).sum(dim=1).tolist() == [N, N]
    assert torch.equal(
        inputs["mm_token_type_ids"], (inputs["input_ids"] == loaded.adapter.image_token_id).long()
    )


def test_resolution_default_when_the_processor_pins_none():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    assert fixed_resolution(Qwen2VLImageProcessorPil()) == (448, 448)
    assert fixed_resolution(Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)) == (224, 224)
    assert fixed_resolution(Qwen2VLImageProcessorPil(min_pixels=672 * 672, max_pixels=672 * 672)) == (
        672,
        672,
    )


def test_vision_tower_matches_stock_and_scores_received_attention(qwen_dir):
    loaded = load(qwen_dir)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS)
    with torch.no_grad():
        stock = loaded.model.model.visual(
            inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]
        ).pooler_output
        out = loaded.adapter.vision_layer(inputs["pixel_values"], need_scores=True)
    torch.testing.assert_close(out.hidden[:, 1:], stock.view(2, N, -1), atol=1e-5, rtol=1e-5)
    assert not out.hidden[:, 0].any()  # the stand-in CLS row
    # Attention received, summed over all S queries, mean over heads and each 2 x 2 unit: sums to S / 4.
    assert out.cls_attention.shape == (2, N)
    torch.testing.assert_close(out.cls_attention.sum(dim=1), torch.full((2,), 256 / 4), atol=1e-3, rtol=0)
    assert out.keys.shape[:2] == (2, N + 1)
    # Gradients reach the scores only when asked for (a loss on them); compression ranks without them.
    assert not loaded.adapter.vision_layer(
        inputs["pixel_values"], need_scores=True
    ).cls_attention.requires_grad
    asked = loaded.adapter.vision_layer(inputs["pixel_values"], need_scores=True, score_grad=True)
    assert asked.cls_attention.requires_grad
    torch.testing.assert_close(asked.cls_attention.detach(), out.cls_attention)


def test_stage1_matches_a_loop_over_the_stock_vision_tower(qwen_dir):
    """Kept patches and merged tokens against `stock_qwen_stage1`: the stock tower run as it is (window
    order and all), scores read from its last block's own attention probabilities, 2 x 2 means in raster
    order. Catches scores left in window order, which the bundle (traced from the same code) cannot."""
    loaded = load(qwen_dir)
    cfg = budget_config(loaded)
    compress(loaded.model, cfg)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS, cfg)
    trace = DuetTrace()
    with torch.no_grad():
        loaded.model(**inputs, duet_trace=trace, use_cache=False, logits_to_keep=1)
        kept, tokens = stock_qwen_stage1(
            oracle_model(qwen_dir),
            inputs["pixel_values"],
            inputs["image_grid_thw"],
            cfg.dominant,
            cfg.contextual,
            cfg.cluster_width,
        )
    assert cfg.contextual > 0
    for b in range(2):
        assert trace.stage1.kept[b].tolist() == kept[b], f"image {b}: other patches kept"
        torch.testing.assert_close(trace.stage1.tokens[b], tokens[b], atol=1e-5, rtol=1e-5)


def test_stage2_matches_a_loop_over_the_stock_decoder_with_kept_positions(qwen_dir):
    """Kept indices and logits against `loop_decoder` on the stock decoder: the oracle's Stage-1 tokens at
    their positions in the uncompressed prompt (stock `get_rope_index`), kept through each drop, scored
    from each drop layer's own attention probabilities."""
    loaded = load(qwen_dir)
    cfg = budget_config(loaded)
    compress(loaded.model, cfg)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS, cfg)
    trace = DuetTrace()
    with torch.no_grad():
        logits = loaded.model(**inputs, duet_trace=trace, use_cache=False).logits
    oracle = oracle_model(qwen_dir)
    full = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS)
    image = loaded.adapter.image_token_id
    v = cfg.dominant + cfg.contextual
    schedule = {
        layer: math.floor(Fraction(str(r)) * v)
        for layer, r in zip(cfg.drop_layers, cfg.keep_ratios, strict=True)
    }
    with torch.no_grad():
        kept, tokens = stock_qwen_stage1(
            oracle,
            full["pixel_values"],
            full["image_grid_thw"],
            cfg.dominant,
            cfg.contextual,
            cfg.cluster_width,
        )
        positions, _ = oracle.model.get_rope_index(
            full["input_ids"],
            mm_token_type_ids=full["mm_token_type_ids"],
            image_grid_thw=full["image_grid_thw"],
            attention_mask=full["attention_mask"],
        )
        for b in range(2):
            real = full["attention_mask"][b].bool()
            ids = full["input_ids"][b][real]
            rank = (ids == image).long().cumsum(0) - 1
            rows = [i for i in range(len(ids)) if ids[i] != image or int(rank[i]) in kept[b]]
            embeds = oracle.model.language_model.embed_tokens(ids[rows]).clone()
            visual = ids[rows] == image
            embeds[visual] = tokens[b]
            # the salient words of the compressed prompt, on the same text tokens
            ours = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
            salient = inputs["duet_query_mask"][b][inputs["attention_mask"][b].bool()]
            assert torch.equal(ours[ours != image], ids[rows][~visual])
            query = torch.zeros(len(rows), dtype=torch.bool)
            query[~visual] = salient[ours != image]
            dropped, ref_logits, _ = loop_decoder(
                oracle, embeds, positions[:, b, real][:, rows], visual, query, schedule, cfg.query,
                recompact=False,
            )  # fmt: skip
            for layer, indices in dropped.items():
                assert trace.stage2[layer][b].tolist() == indices, f"sample {b}, drop before layer {layer}"
            torch.testing.assert_close(logits[b][-len(ref_logits) :], ref_logits, atol=1e-4, rtol=1e-5)


# Every merged token kept through both stages' code: Stage 1's merge path keeping all N, Stage 2's drop path
# keeping ratio 1.0 (with the M-RoPE positions of the kept tokens and the decode offsets of each group).
KEEP_ALL = DuetConfig(dominant=N, contextual=0, drop_layers=(2, 5), keep_ratios=(1.0, 1.0))


@pytest.mark.parametrize("config", ["budget=N", KEEP_ALL], ids=["budget-N", "both-stages-keep-all"])
def test_identity_at_full_budget_against_stock_generate(qwen_dir, config):
    loaded = load(qwen_dir)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS)
    assert not bool(inputs["attention_mask"].all())  # the prompts differ in length: left padding
    stock, stock_logits = reference_generate(loaded, inputs, 12)
    if config == "budget=N":
        config = resolve_budget(N, loaded.adapter.geometry(), rules=loaded.adapter.rules)
        assert not config.enabled
    compress(loaded.model, config)
    trace = DuetTrace()
    ours, our_logits = reference_generate(loaded, {**inputs, "duet_trace": trace}, 12)
    assert trace.visual_tokens == N  # the compressed forward ran
    if config.enabled:  # the stages' code ran, and removed nothing
        assert trace.stage1.kept.tolist() == [list(range(N))] * 2
        assert sorted(trace.keep_index) == [2, 5]
        assert all(torch.equal(k, torch.arange(k.shape[1]).expand_as(k)) for k in trace.keep_index.values())
    np.testing.assert_array_equal(stock, ours)
    for step in (0, 5, 11):
        np.testing.assert_allclose(stock_logits[step], our_logits[step], atol=1e-5)


def test_stage1_and_stage2_keep_the_budgeted_counts(qwen_dir):
    loaded = load(qwen_dir)
    cfg = budget_config(loaded)
    assert cfg.stage1 and cfg.stage2 and cfg.drop_layers == (4, 6) and cfg.keep_ratios == (0.5, 0.25)
    compress(loaded.model, cfg)
    v = cfg.dominant + cfg.contextual
    inputs = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS, cfg)
    assert (inputs["input_ids"] == loaded.adapter.image_token_id).sum(dim=1).tolist() == [v, v]
    assert "mm_token_type_ids" not in inputs
    ids, _ = reference_generate(loaded, inputs, 6)
    assert ids.shape == (2, 6)
    trace = DuetTrace()
    with torch.no_grad():
        loaded.model(**inputs, duet_trace=trace, use_cache=False)
    s1 = trace.stage1
    assert s1.dominant.shape == (2, cfg.dominant)  # no CLS: every dominant token is a patch
    assert s1.anchors.shape == (2, cfg.contextual)
    assert s1.kept.shape == (2, v) and s1.tokens.shape[:2] == (2, v)
    for b, row in enumerate(s1.kept.tolist()):
        assert row == sorted(set(row))  # raster order, no repeats
        assert set(row) == set(s1.dominant[b].tolist()) | set(s1.anchors[b].tolist())
    assert trace.visual_tokens == v
    assert [tuple(k.shape) for k in trace.stage2.values()] == [(2, v // 2), (2, v // 4)]
    # The processor's N-placeholder prompt gives the same answer (surplus placeholders removed); neither
    # has a salient-query mask here, so both score with all text after the image.
    full = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS)
    short = {k: x for k, x in inputs.items() if k != "duet_query_mask"}
    with torch.no_grad(), pytest.warns(UserWarning, match="no duet_query_mask"):
        a = loaded.model(**short, logits_to_keep=1).logits
        b = loaded.model(**full, logits_to_keep=1).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kept_tokens_keep_their_3d_positions(qwen_dir):
    loaded = load(qwen_dir)
    cfg = budget_config(loaded)
    full = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS)
    reference = stock_positions(loaded, full)  # [3, B, T_full]
    compress(loaded.model, cfg)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS, cfg)
    seen = record_positions(loaded.model)
    trace = DuetTrace()
    new_tokens = 4
    reference_generate(loaded, {**inputs, "duet_trace": trace}, new_tokens)
    groups = len(cfg.drop_layers) + 1
    prefill = [p for p in seen if p.dim() == 3 and p.shape[-1] > 1]
    assert len(prefill) == groups + len(cfg.drop_layers)  # one per group, one per drop's scoring
    first = prefill[0]
    image = loaded.adapter.image_token_id
    for b in range(2):
        real = full["attention_mask"][b].bool()
        is_image = full["input_ids"][b] == image
        rank = is_image.long().cumsum(0) - 1
        kept_cells = torch.zeros(len(rank), dtype=torch.bool)
        kept_cells[is_image] = torch.isin(rank[is_image], trace.stage1.kept[b])
        keep = real & (~is_image | kept_cells)
        expected = reference[:, b, keep]
        ours = first[:, b, inputs["attention_mask"][b].bool()]
        assert torch.equal(ours, expected), f"row {b}: Stage-1 positions differ from get_rope_index's"
        # The image's positions are 2-D (t fixed, h/w varying), not the 1-D positions of a text model.
        assert (
            len(set(ours[1][inputs["input_ids"][b][inputs["attention_mask"][b].bool()] == image].tolist()))
            > 1
        )
    # Stage 2: every surviving token keeps the position it had (no re-compaction).
    group_positions = prefill[0::2]  # order: group 0, drop scoring, group 1, drop scoring, group 2
    previous = first
    for layer, later in zip(cfg.drop_layers, group_positions[1:], strict=True):
        index = trace.keep_index[layer]
        assert torch.equal(later, torch.stack([torch.gather(p, 1, index) for p in previous]))
        previous = later
    # Decoding continues where the uncompressed model would: max position + 1 + step, in every group.
    decode = [p for p in seen if p.dim() == 2]
    assert len(decode) == groups * (new_tokens - 1)
    start = reference.amax(dim=(0, 2)) + 1
    for step in range(new_tokens - 1):
        for g in range(groups):
            assert decode[step * groups + g][:, 0].tolist() == (start + step).tolist()


def test_bad_inputs_give_one_line_errors(qwen_dir):
    loaded = load(qwen_dir)
    adapter = loaded.adapter
    cfg = budget_config(loaded)
    compress(loaded.model, cfg)
    inputs = prepare_inputs(loaded.processor, adapter, images()[:1], PROMPTS[:1], cfg)

    def error(**changes) -> str:
        with pytest.raises(DuetError) as info, torch.no_grad():
            loaded.model(**{**inputs, **changes})
        message = str(info.value)
        assert "\n" not in message
        return message

    # Pixels of another resolution (a processor that did not resize to 224 x 224).
    assert "not whole 224x224 images" in error(pixel_values=torch.zeros(64, 1176))
    assert "image_grid_thw [(1, 16, 32)]" in error(image_grid_thw=torch.tensor([[1, 16, 32]]))
    two = prepare_inputs(loaded.processor, adapter, [images()], PROMPTS[:1], cfg)
    assert "one image per prompt" in error(**two)
    with pytest.raises(DuetError, match="not a multiple of 28"):
        adapter.set_resolution(100, 100)
    with pytest.raises(DuetError, match="contextual=2 exceeds the 1 patches left after 63 dominant"):
        DuetConfig(dominant=63, contextual=2).validate(adapter.geometry())
    with pytest.raises(DuetError, match="asks for 65 patches"):
        DuetConfig(dominant=65).validate(adapter.geometry())


def test_bundle_matches_pytorch(qwen_dir, qwen_bundle):
    vlm = OnnxVLM(qwen_bundle, provider="cpu")
    image = vlm.manifest["image"]
    assert (image["size"], image["pixel_rows"], image["pixel_shape"]) == ([224, 224], 256, [1176])
    loaded = load(qwen_dir)
    cfg = budget_config(loaded)
    v = cfg.dominant + cfg.contextual
    assert vlm.manifest["decode_position_offsets"] == [8 - v, 8 - v // 2, 8 - v // 4]
    assert "M-RoPE" in vlm.manifest["positions"]
    inputs = vlm._pad_batch(vlm.encode(images(), PROMPTS))
    logits: list[np.ndarray] = []
    ids = vlm.generate_ids(inputs, GenerationSettings(max_new_tokens=NEW_TOKENS), logits_out=logits)[:2]
    onnx_kept = vlm.last_state.keep_index

    compress(loaded.model, cfg)
    pt = prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS, cfg)
    reference, reference_logits = reference_generate(loaded, pt, NEW_TOKENS)
    np.testing.assert_array_equal(ids, reference[:, : ids.shape[1]])
    assert len(logits) >= 12
    for step in range(min(len(logits), len(reference_logits))):
        np.testing.assert_allclose(logits[step][:2], reference_logits[step], atol=1e-4, rtol=0)

    trace = DuetTrace()
    wide = {
        "input_ids": torch.from_numpy(inputs["input_ids"][:2]),
        "attention_mask": torch.from_numpy(inputs["attention_mask"][:2]),
        "pixel_values": torch.from_numpy(inputs["pixel_values"][: 2 * 256]),
        "duet_query_mask": torch.from_numpy(inputs["query_mask"][:2]),
    }
    with torch.no_grad():
        loaded.model(**wide, duet_trace=trace, use_cache=False, logits_to_keep=1)
    np.testing.assert_array_equal(onnx_kept["stage1_dominant"][:2], trace.stage1.dominant.numpy())
    np.testing.assert_array_equal(onnx_kept["stage1_kept"][:2], trace.stage1.kept.numpy())
    assert trace.keep_index
    for layer, index in trace.keep_index.items():
        np.testing.assert_array_equal(onnx_kept[f"keep_index.{layer}"][:2], index.numpy())


def test_uncompressed_bundle_matches_stock_transformers(qwen_dir, tmp_path):
    loaded = load(qwen_dir)
    export_bundle(loaded, tmp_path / "full", None, ExportOptions("cpu", 32, 8, 2), echo=lambda m: None)
    vlm = OnnxVLM(tmp_path / "full", provider="cpu")
    assert vlm.manifest["decode_position_offsets"] == [8 - N]
    logits: list[np.ndarray] = []
    inputs = vlm._pad_batch(vlm.encode(images(), PROMPTS))
    ids = vlm.generate_ids(inputs, GenerationSettings(max_new_tokens=8), logits_out=logits)[:2]
    stock, stock_logits = reference_generate(
        loaded, prepare_inputs(loaded.processor, loaded.adapter, images(), PROMPTS), 8
    )
    np.testing.assert_array_equal(ids, stock[:, : ids.shape[1]])
    for step in range(len(stock_logits)):
        np.testing.assert_allclose(logits[step][:2], stock_logits[step], atol=1e-4, rtol=0)


def test_inspect_names_patches_without_cls_and_draws_the_grid(qwen_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from duet_export.cli import cli

    image = tmp_path / "in.png"
    random_image(5, size=90).save(image)
    args = ["inspect", str(qwen_dir), "--image", str(image), "--prompt", PROMPTS[0], "--budget", "21"]
    result = CliRunner().invoke(cli, [*args, "--json", "--overlay", str(tmp_path / "kept.png")])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{") :])
    s1 = info["stage1"]
    assert s1["cls"] is False and s1["tokens"] == len(s1["dominant"]) + len(s1["contextual"])
    assert s1["kept"] == sorted(s1["dominant"] + [c["anchor"] for c in s1["contextual"]])
    anchors = {c["anchor"] for c in s1["contextual"]}
    for drop in info["stage2"]:
        for index, name in zip(drop["kept"], drop["kept_tokens"], strict=True):
            kind = "context" if s1["kept"][index] in anchors else "patch"
            assert name == f"{kind}:{s1['kept'][index]}"
    assert (tmp_path / "kept.png").stat().st_size > 1000


def test_a_conversation_trains_as_one_sequence(qwen_dir, tmp_path):
    """Qwen's template ends an answer with "<|im_end|>\n": the follow-up turn starts with that newline."""
    path = tmp_path / "image.png"
    random_image(3).save(path)
    conversation = TrainingExample(
        "c",
        path,
        "What digit is in row 1, column 2?",
        "7",
        follow_ups=(("Is there a 3 in the image?", "no"),),
    )
    loaded = load(qwen_dir)
    text = check_conversation_batch(loaded, conversation)
    # (the tiny word-level tokenizer decodes with a space between tokens)
    assert (
        "7 <|im_end|> \n <|im_start|> user \n is there a 3 in the image ? <|im_end|> \n <|im_start|> assistant \n no"
        in text
    )
