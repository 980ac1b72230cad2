"""Video-LLaVA: a tiny checkpoint saved and loaded like LanguageBind/Video-LLaVA-7B-hf, compressed per frame
(Stage 1) and per clip (Stage 2), exported, and checked against stock transformers and PyTorch DUET."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from duet_export import DuetConfig, GenerationSettings, compress, prepare_inputs
from duet_export.errors import DuetError
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.forward import DuetTrace
from duet_export.loading import load, load_visual
from duet_export.runtimes import OnnxVLM
from duet_export.stages.budget import resolve_budget
from duet_export.tiny import TinyLlavaSpec, build_tiny_video_llava

from conftest import NEW_TOKENS, PROMPTS, random_image, reference_generate
from loops import loop_decoder, loop_v2v, oracle_model, ranked_with_margin, stock_clip_stage1_inputs

FRAMES = 4


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return build_tiny_video_llava(
        tmp_path_factory.mktemp("models") / "tiny-video-llava", TinyLlavaSpec(), FRAMES
    )


def clip(seed: int, size: int = 64) -> list[Image.Image]:
    return [random_image(seed * 10 + f, size) for f in range(FRAMES)]


def budget_config(loaded):
    """The paper's ~93 % video setting scaled to the tiny clip (4 frames x 64 patches)."""
    geometry = loaded.adapter.geometry()
    return resolve_budget(0.066 * geometry.total_patches, geometry, rules=loaded.adapter.rules)


@pytest.fixture(scope="module")
def video_bundle(video_dir, tmp_path_factory):
    loaded = load(video_dir)
    out = tmp_path_factory.mktemp("bundles") / "video"
    export_bundle(
        loaded, out, budget_config(loaded), ExportOptions("cpu", 32, NEW_TOKENS, 2), echo=lambda m: None
    )
    return out


def test_loads_with_frames_from_config(video_dir):
    loaded = load(video_dir)
    assert loaded.adapter.family == "video-llava"
    geometry = loaded.adapter.geometry()
    assert (geometry.num_patches, geometry.frames) == (64, FRAMES)
    assert loaded.adapter.uncompressed_tokens_per_image == 65  # video frames keep CLS


# Every patch kept through both stages' code: Stage 1 keeps CLS + all 64 patches per frame through the merge
# path (a video frame feeds all 65 tokens, as the stock model), Stage 2 keeps ratio 1.0 through the drop path.
KEEP_ALL = DuetConfig(dominant=65, contextual=0, drop_layers=(2, 5), keep_ratios=(1.0, 1.0))


@pytest.mark.parametrize("config", ["budget=N", KEEP_ALL], ids=["budget-N", "both-stages-keep-all"])
def test_identity_at_full_budget_against_stock_generate(video_dir, config):
    loaded = load(video_dir)
    clips = [clip(1), clip(2, size=80)]
    inputs = prepare_inputs(loaded.processor, loaded.adapter, clips, PROMPTS)
    assert inputs["pixel_values_videos"].shape == (2, FRAMES, 3, 64, 64)
    assert int((inputs["input_ids"][0] == loaded.adapter.image_token_id).sum()) == FRAMES * 65
    stock, stock_logits = reference_generate(loaded, inputs, 12)
    if config == "budget=N":
        config = resolve_budget(loaded.adapter.geometry().total_patches, loaded.adapter.geometry())
    compress(loaded.model, config)
    trace = DuetTrace()
    ours, our_logits = reference_generate(loaded, {**inputs, "duet_trace": trace}, 12)
    np.testing.assert_array_equal(stock, ours)
    np.testing.assert_allclose(stock_logits[0], our_logits[0], atol=1e-5)
    if config.enabled:  # the stages' code ran, and removed nothing
        assert trace.stage1.dominant.tolist() == [list(range(64))] * (2 * FRAMES)
        assert sorted(trace.keep_index) == [2, 5]
        assert all(torch.equal(k, torch.arange(k.shape[1]).expand_as(k)) for k in trace.keep_index.values())
        for step in (5, 11):
            np.testing.assert_allclose(stock_logits[step], our_logits[step], atol=1e-5)


def test_stage1_per_frame_and_stage2_over_the_clip(video_dir):
    loaded = load(video_dir)
    cfg = budget_config(loaded)
    compress(loaded.model, cfg)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, [clip(3)], PROMPTS[:1], cfg)
    per_frame = cfg.dominant + cfg.contextual
    assert int((inputs["input_ids"][0] == loaded.adapter.image_token_id).sum()) == FRAMES * per_frame
    trace = DuetTrace()
    with torch.no_grad():
        loaded.model(**inputs, duet_trace=trace, use_cache=False)
    assert trace.stage1.tokens.shape[0] == FRAMES  # one merge per frame
    assert trace.visual_tokens == FRAMES * per_frame
    first_drop = min(trace.stage2)
    kept = trace.stage2[first_drop][0]
    # Stage 2 ranks the whole clip: what it keeps may come from any frame.
    assert len(kept) == int(cfg.keep_ratios[0] * FRAMES * per_frame)
    assert int(kept.max()) < FRAMES * per_frame


def test_stage1_per_frame_and_one_stage2_ranking_over_the_clip_match_a_loop(video_dir):
    """Kept indices and logits against loops over the stock modules: Stage 1 by `loop_v2v` on each frame's
    stock CLIP feature layer (its own attention probabilities), the frames' tokens in order, then one
    Stage-2 ranking over all of the clip's visual tokens on the stock decoder."""
    loaded = load(video_dir)
    cfg = DuetConfig(dominant=12, contextual=4, drop_layers=(2, 5), keep_ratios=(0.5, 0.25))
    compress(loaded.model, cfg)
    clips = [clip(4), clip(5, size=80)]
    inputs = prepare_inputs(loaded.processor, loaded.adapter, clips, PROMPTS, cfg)
    trace = DuetTrace()
    with torch.no_grad():
        logits = loaded.model(**inputs, duet_trace=trace, use_cache=False).logits
    oracle = oracle_model(video_dir)
    per_frame = cfg.dominant + cfg.contextual
    v = FRAMES * per_frame
    schedule = {2: v // 2, 5: v // 4}
    with torch.no_grad():
        pixels = inputs["pixel_values_videos"].flatten(0, 1)
        hidden, scores, keys = stock_clip_stage1_inputs(
            oracle.model.video_tower, pixels, oracle.config.vision_feature_layer
        )
        features = []
        for f in range(len(pixels)):
            ranked_with_margin(scores[f].tolist(), cfg.dominant - 1, f"frame {f} dominant")
            tokens, dominant, *_ = loop_v2v(
                hidden[f], scores[f], keys[f], cfg.dominant, cfg.contextual, cfg.cluster_width
            )
            assert trace.stage1.dominant[f].tolist() == dominant, f"frame {f}"
            features.append(oracle.model.multi_modal_projector(tokens))
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            ids = inputs["input_ids"][b][real]
            visual = ids == loaded.adapter.image_token_id
            embeds = oracle.model.language_model.embed_tokens(ids).clone()
            embeds[visual] = torch.cat(features[b * FRAMES : (b + 1) * FRAMES])
            kept, ref_logits, _ = loop_decoder(
                oracle, embeds, torch.arange(len(ids)), visual, inputs["duet_query_mask"][b][real],
                schedule, cfg.query, recompact=True,
            )  # fmt: skip
            for layer, indices in kept.items():
                assert trace.stage2[layer][b].tolist() == indices, f"clip {b}, drop before layer {layer}"
            # what survives the first drop comes from several frames: one ranking, not one per frame
            assert len({i // per_frame for i in kept[2]}) > 1
            torch.testing.assert_close(logits[b][-len(ref_logits) :], ref_logits, atol=1e-4, rtol=1e-5)


def test_bundle_matches_pytorch(video_dir, video_bundle):
    vlm = OnnxVLM(video_bundle, provider="cpu")
    clips, prompts = [clip(1), clip(2, size=80)], PROMPTS
    inputs = vlm._pad_batch(vlm.encode(clips, prompts))
    logits: list[np.ndarray] = []
    ids = vlm.generate_ids(inputs, GenerationSettings(max_new_tokens=NEW_TOKENS), logits_out=logits)[:2]
    onnx_kept = vlm.last_state.keep_index

    loaded = load(video_dir)
    cfg = budget_config(loaded)
    compress(loaded.model, cfg)
    pt = prepare_inputs(loaded.processor, loaded.adapter, clips, prompts, cfg)
    reference, reference_logits = reference_generate(loaded, pt, NEW_TOKENS)
    np.testing.assert_array_equal(ids, reference[:, : ids.shape[1]])
    for step in range(min(17, len(logits))):
        np.testing.assert_allclose(logits[step][:2], reference_logits[step], atol=1e-4, rtol=0)
    assert len(logits) >= 17

    trace = DuetTrace()
    wide = {
        "input_ids": torch.from_numpy(inputs["input_ids"][:2]),
        "attention_mask": torch.from_numpy(inputs["attention_mask"][:2]),
        "pixel_values": torch.from_numpy(inputs["pixel_values"][: 2 * FRAMES]),
        "duet_query_mask": torch.from_numpy(inputs["query_mask"][:2]),
    }
    with torch.no_grad():
        loaded.model(**wide, duet_trace=trace, use_cache=False, logits_to_keep=1)
    np.testing.assert_array_equal(onnx_kept["stage1_dominant"][: 2 * FRAMES], trace.stage1.dominant.numpy())
    for layer, index in trace.keep_index.items():
        np.testing.assert_array_equal(onnx_kept[f"keep_index.{layer}"][:2], index.numpy())


def test_clip_from_folder_and_frame_count_errors(video_dir, video_bundle, tmp_path):
    loaded = load(video_dir)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(10):
        random_image(i).save(folder / f"frame_{i:03d}.png")
    frames = load_visual(folder, loaded.adapter)
    assert len(frames) == FRAMES  # sampled evenly from the 10 files
    short = tmp_path / "short"
    short.mkdir()
    for i in range(FRAMES - 1):
        random_image(i).save(short / f"{i}.png")
    with pytest.raises(DuetError, match=f"the clip has {FRAMES - 1} frames; the model takes {FRAMES}"):
        load_visual(short, loaded.adapter)
    with pytest.raises(DuetError, match="the clip has 2 frames"):
        prepare_inputs(loaded.processor, loaded.adapter, [clip(1)[:2]], PROMPTS[:1])
    vlm = OnnxVLM(video_bundle, provider="cpu")
    with pytest.raises(DuetError, match="the clip has 3 frames; the model takes 4"):
        vlm.generate([short], PROMPTS[:1])
    answers = vlm.generate([folder], PROMPTS[:1], GenerationSettings(max_new_tokens=4))
    assert len(answers) == 1


def test_clip_from_video_file(video_dir, tmp_path):
    av = pytest.importorskip("av", reason="PyAV is the optional [video] extra")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 64), (20 * i, 0, 0)))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    loaded = load(video_dir)
    frames = load_visual(path, loaded.adapter)
    assert len(frames) == FRAMES and frames[0].size == (64, 64)
    reds = [np.asarray(f)[..., 0].mean() for f in frames]
    assert reds == sorted(reds) and reds[-1] > reds[0] + 60  # evenly spread over the 12 frames, in order
    random_image(0).save(tmp_path / "one.png")
    with pytest.raises(DuetError, match="is one image; a video model takes a clip"):
        load_visual(tmp_path / "one.png", loaded.adapter)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(DuetError, match="is not a video PyAV can read"):
        load_visual(broken, loaded.adapter)
