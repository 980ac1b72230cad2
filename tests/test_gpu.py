"""Parity and the device-resident path on the CUDA provider (`pytest -m gpu`; needs onnxruntime-gpu and an
NVIDIA GPU). benchmarks/gpu_session.sh runs these first, then the GPU benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from duet_export import GenerationSettings, compress, prepare_inputs
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.loading import load
from duet_export.runtimes import OnnxVLM, ProviderSettings

from conftest import NEW_TOKENS, PROMPTS, bundle_config, random_image, reference_generate

pytestmark = pytest.mark.gpu

IMAGES = [random_image(1), random_image(2, size=80)]


@pytest.fixture(scope="module")
def cuda_bundle(tiny_dir, tmp_path_factory) -> Path:
    """A compressed bundle for the cuda target (lowered, static, fused attention), batch 2."""
    out = tmp_path_factory.mktemp("gpu") / "cuda"
    loaded = load(tiny_dir)
    export_bundle(
        loaded, out, bundle_config(loaded), ExportOptions("cuda", 32, NEW_TOKENS, 2), echo=lambda m: None
    )
    return out


@pytest.mark.parametrize(
    "cuda_graph, device_cache", [(False, True), (True, True), (False, False), (True, False)]
)
def test_cuda_bundle_matches_pytorch(tiny_dir, cuda_bundle, cuda_graph, device_cache):
    vlm = OnnxVLM(
        cuda_bundle,
        provider="cuda",
        settings=ProviderSettings(cuda_graph=cuda_graph),
        device_cache=device_cache,
    )
    assert vlm.bundle.provider == "CUDAExecutionProvider"
    assert (vlm.cache is not None) == device_cache
    logits: list[np.ndarray] = []
    inputs = vlm._pad_batch(vlm.encode(IMAGES, PROMPTS))
    ids = vlm.generate_ids(inputs, GenerationSettings(max_new_tokens=NEW_TOKENS), logits_out=logits)
    loaded = load(tiny_dir)
    cfg = bundle_config(loaded)
    compress(loaded.model, cfg)
    pt = prepare_inputs(loaded.processor, loaded.adapter, IMAGES, PROMPTS, cfg)
    reference, reference_logits = reference_generate(loaded, pt, NEW_TOKENS)
    np.testing.assert_array_equal(ids, reference[:, : ids.shape[1]])
    assert ids.shape == reference.shape  # as many new tokens as PyTorch generated, not a prefix of them
    assert len(logits) >= 17, "generation stopped before 16 decode steps: pick prompts that do not hit EOS"
    for step in range(17):
        np.testing.assert_allclose(logits[step], reference_logits[step], atol=1e-3, rtol=0)


def test_device_cache_on_cuda_moves_ids_slots_and_logits_only(cuda_bundle):
    """The cache lives in GPU memory: per step, token ids and slot numbers up, logits down (instrumented),
    against the whole cache each step with the host-side loop; the same tokens both ways."""
    device = OnnxVLM(cuda_bundle, provider="cuda")
    host = OnnxVLM(cuda_bundle, provider="cuda", device_cache=False)
    assert device.cache is not None and device.cache.device == "cuda"
    settings = GenerationSettings(max_new_tokens=8)
    answers = {name: [a.token_ids for a in vlm.generate(IMAGES, PROMPTS, settings)] for name, vlm in
               (("device", device), ("host", host))}  # fmt: skip
    assert answers["device"] == answers["host"]
    b, groups = device.batch, len(device.capacity)
    assert device.transfer_report()["per_step_bytes"] == 8 * b + 8 * groups + 4 * b * device.vocab_size
    assert host.transfer_report()["per_step_bytes"] > 100 * device.transfer_report()["per_step_bytes"]


def test_cache_writer_is_in_place_on_cuda(cuda_bundle):
    """onnxruntime's CUDA ScatterND writes into the bound buffer itself: same address, only the slot changes."""
    vlm = OnnxVLM(cuda_bundle, provider="cuda")
    addresses = {name: v.data_ptr() for name, v in vlm.cache.cache.items()}
    inputs = vlm._pad_batch(vlm.encode(IMAGES, PROMPTS))
    logits, state = vlm.prefill(inputs)
    before = [vlm.cache.read(i, "value") for i in range(len(vlm.layer_group))]
    vlm.step(logits.argmax(-1), state)
    for i, g in enumerate(vlm.layer_group):
        changed = np.nonzero((vlm.cache.read(i, "value") != before[i]).any(axis=(0, 1, 3)))[0].tolist()
        assert changed == [vlm.group_lengths[g]]
    assert {name: v.data_ptr() for name, v in vlm.cache.cache.items()} == addresses


def test_fused_attention_runs_on_the_cuda_provider(cuda_bundle, tmp_path):
    """Every MultiHeadAttention node of the cuda bundle's prefill is placed on CUDA (no CPU fallback)."""
    vlm = OnnxVLM(cuda_bundle, provider="cuda")
    inputs = vlm._pad_batch(vlm.encode(IMAGES, PROMPTS))
    feed = vlm.prefill_feed(inputs, vlm.vision(inputs["pixel_values"]))
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "prefill")
    session = ort.InferenceSession(
        str(cuda_bundle / "prefill.onnx"),
        options,
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    placed = {
        e["args"].get("provider")
        for e in events
        if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "MultiHeadAttention"
    }
    assert placed == {"CUDAExecutionProvider"}


def test_float16_cuda_bundle_follows_float16_pytorch(tiny_dir, tmp_path):
    """A float16 bundle on CUDA against the float16 model on the same GPU: same first tokens."""
    import torch

    loaded = load(tiny_dir, dtype=torch.float16)
    cfg = bundle_config(loaded)
    export_bundle(loaded, tmp_path / "b", cfg, ExportOptions("cuda", 32, 8, 2), echo=lambda m: None)
    vlm = OnnxVLM(tmp_path / "b", provider="cuda")
    inputs = vlm._pad_batch(vlm.encode(IMAGES, PROMPTS))
    ids = vlm.generate_ids(inputs, GenerationSettings(max_new_tokens=4))
    gpu = load(tiny_dir, dtype=torch.float16, device="cuda")
    compress(gpu.model, cfg)
    pt = {
        k: v.to("cuda") for k, v in prepare_inputs(gpu.processor, gpu.adapter, IMAGES, PROMPTS, cfg).items()
    }
    with torch.no_grad():
        out = gpu.model.generate(
            **pt, max_new_tokens=4, do_sample=False, pad_token_id=gpu.tokenizer.pad_token_id
        )
    np.testing.assert_array_equal(ids[:, :2], out[:, pt["input_ids"].shape[1] :][:, :2].cpu().numpy())
