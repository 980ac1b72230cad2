"""`positions=keep` bundles against PyTorch: kept indices (and the places they sit at), logits and greedy
tokens for each target's pipeline; Video-LLaVA; and older bundles, whose manifest has no `position_mode`.

The cpu bundle runs in the default suite; migraphx, cuda and the video bundle (an export each) are slow."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from duet_export import GenerationSettings, compress, prepare_inputs
from duet_export.errors import DuetError
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.forward import DuetTrace
from duet_export.loading import load
from duet_export.runtimes import OnnxVLM
from duet_export.tiny import TinyLlavaSpec, build_tiny_video_llava

from conftest import NEW_TOKENS, PROMPTS, bundle_config, random_image, reference_generate

STEPS = 17  # the prefill's logits + 16 decode steps
FRAMES = 4


def keep_config(loaded):
    return dataclasses.replace(bundle_config(loaded), positions="keep")


def _export(model_dir, out, target: str, batch: int, config=keep_config):
    loaded = load(model_dir)
    options = ExportOptions(target, 32, NEW_TOKENS, batch)
    export_bundle(loaded, out, config(loaded), options, echo=lambda m: None)
    return out


@pytest.fixture(scope="module")
def keep_bundle(tiny_dir, tmp_path_factory):
    """Keep bundles, exported once per target on first use."""
    made = {}

    def get(target: str, batch: int):
        if target not in made:
            made[target] = _export(tiny_dir, tmp_path_factory.mktemp("keep") / target, target, batch)
        return made[target]

    return get


def compare_with_pytorch(bundle, model_dir, visuals, config_of, batch: int, frames: int = 1) -> None:
    """The bundle's kept indices, logits and greedy tokens against the compressed PyTorch model's."""
    vlm = OnnxVLM(bundle, provider="cpu")
    assert vlm.position_mode == "keep"
    visuals, prompts = visuals[:batch], PROMPTS[:batch]
    inputs = vlm._pad_batch(vlm.encode(visuals, prompts))
    logits: list[np.ndarray] = []
    ids = vlm.generate_ids(inputs, GenerationSettings(max_new_tokens=NEW_TOKENS), logits_out=logits)[:batch]
    onnx_kept = vlm.last_state.keep_index

    loaded = load(model_dir)
    cfg = config_of(loaded)
    compress(loaded.model, cfg)
    pt = prepare_inputs(loaded.processor, loaded.adapter, visuals, prompts, cfg)
    reference, reference_logits = reference_generate(loaded, pt, NEW_TOKENS)
    np.testing.assert_array_equal(ids, reference[:, : ids.shape[1]])
    assert ids.shape[1] == reference.shape[1]
    for step in range(min(STEPS, len(logits))):
        np.testing.assert_allclose(logits[step][:batch], reference_logits[step], atol=1e-4, rtol=0)
    assert len(logits) >= STEPS, "generation stopped before 16 decode steps"

    wide = {  # PyTorch on exactly the bundle's (wider-padded) inputs, so that indices compare one to one
        "input_ids": torch.from_numpy(inputs["input_ids"][:batch]),
        "attention_mask": torch.from_numpy(inputs["attention_mask"][:batch]),
        "duet_query_mask": torch.from_numpy(inputs["query_mask"][:batch]),
        **loaded.adapter.pixel_inputs(torch.from_numpy(inputs["pixel_values"][: batch * frames])),
    }
    trace = DuetTrace()
    with torch.no_grad():
        loaded.model(**wide, duet_trace=trace, use_cache=False, logits_to_keep=1)
    n = batch * frames
    np.testing.assert_array_equal(onnx_kept["stage1_dominant"][:n], trace.stage1.dominant.numpy())
    np.testing.assert_array_equal(onnx_kept["stage1_anchors"][:n], trace.stage1.anchors.numpy())
    places = loaded.adapter.stage1_kept(trace.stage1).numpy()
    np.testing.assert_array_equal(onnx_kept["stage1_kept"][:n], places)
    assert set(trace.keep_index) == {int(k.split(".")[1]) for k in onnx_kept if k.startswith("keep_index")}
    for layer, index in trace.keep_index.items():
        np.testing.assert_array_equal(onnx_kept[f"keep_index.{layer}"][:batch], index.numpy())


def _images():
    return [random_image(1), random_image(2, size=80)]


@pytest.mark.parametrize(
    "target, batch",
    [
        ("cpu", 2),
        pytest.param("migraphx", 1, marks=pytest.mark.slow),
        pytest.param("cuda", 2, marks=pytest.mark.slow),
    ],
)
def test_keep_bundle_matches_pytorch(keep_bundle, tiny_dir, target, batch):
    bundle = keep_bundle(target, batch)
    compare_with_pytorch(bundle, tiny_dir, _images(), keep_config, batch)
    manifest = json.loads((bundle / "manifest.json").read_text())
    cfg = keep_config(load(tiny_dir))
    n, v = 64, cfg.dominant + cfg.contextual
    kept = [v] + [int(r * v + 1e-9) for r in cfg.keep_ratios]
    assert manifest["position_mode"] == "keep" and manifest["config"]["positions"] == "keep"
    # a generated token continues after the uncompressed prompt in every layer group
    assert manifest["decode_position_offsets"] == [n - k for k in kept]
    assert "stage1_kept" in [i["name"] for i in manifest["graphs"]["prefill"]["inputs"]]


def test_a_bundle_without_position_mode_is_compact(bundles, tmp_path):
    """Bundles written before the choice existed re-compact positions; a bad value is a one-line error."""
    folder = shutil.copytree(bundles / "cpu", tmp_path / "old")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest.pop("position_mode") == "compact"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert OnnxVLM(folder, provider="cpu").position_mode == "compact"
    manifest["position_mode"] = "sideways"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DuetError, match="'position_mode' must be"):
        OnnxVLM(folder, provider="cpu")


def _video_config(loaded):
    from duet_export.stages.budget import resolve_budget

    geometry = loaded.adapter.geometry()
    config = resolve_budget(0.066 * geometry.total_patches, geometry, rules=loaded.adapter.rules)
    return dataclasses.replace(config, positions="keep")


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return build_tiny_video_llava(tmp_path_factory.mktemp("models") / "video", TinyLlavaSpec(), FRAMES)


def _clips():
    return [[random_image(s * 10 + f, size) for f in range(FRAMES)] for s, size in ((1, 64), (2, 80))]


def test_video_frames_keep_their_places(video_dir):
    """Each frame's run is 1 + N long (the stock model feeds CLS): frame f's CLS at its run's start, its
    patch p at start + 1 + p; text after the clip and decoding continue after 4 x 65 tokens."""
    loaded = load(video_dir)
    cfg = _video_config(loaded)
    compress(loaded.model, cfg)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, _clips()[:1], PROMPTS[:1], cfg)
    adapter = loaded.model.forward.adapter
    seen, rotary = [], adapter.rotary
    adapter.rotary = lambda hidden, p: seen.append(p.clone()) or rotary(hidden, p)
    trace = DuetTrace()
    with torch.no_grad():
        loaded.model.generate(**inputs, duet_trace=trace, max_new_tokens=2, do_sample=False)
    ids = inputs["input_ids"][0]
    video = ids == loaded.adapter.image_token_id
    start = int(video.nonzero()[0])
    s1 = trace.stage1
    expected = [
        start + f * 65 + place
        for f in range(FRAMES)
        for place in [0, *(1 + s1.dominant[f]).tolist(), *(1 + s1.anchors[f]).tolist()]
    ]
    assert seen[0][0][video].tolist() == expected
    after = seen[0][0][~video][start:]
    assert after.tolist() == list(range(start + FRAMES * 65, start + FRAMES * 65 + len(after)))
    real = start + FRAMES * 65 + len(after)
    decode = [int(p[0, 0]) for p in seen if p.shape[-1] == 1]
    assert len(decode) == len(cfg.drop_layers) + 1 and set(decode) == {real}  # one step, every group


@pytest.mark.slow
def test_video_keep_bundle_matches_pytorch(video_dir, tmp_path):
    bundle = _export(video_dir, tmp_path / "video", "cpu", 2, config=_video_config)
    compare_with_pytorch(bundle, video_dir, _clips(), _video_config, 2, frames=FRAMES)
