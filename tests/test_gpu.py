"""Parity on the CUDA provider (`pytest -m gpu`; needs onnxruntime-gpu and an NVIDIA GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from duet_export import GenerationSettings, compress, prepare_inputs
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.loading import load
from duet_export.runtimes import OnnxVLM, ProviderSettings

from conftest import NEW_TOKENS, PROMPTS, bundle_config, random_image, reference_generate

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_bundle_matches_pytorch(tiny_dir, tmp_path, cuda_graph):
    loaded = load(tiny_dir)
    cfg = bundle_config(loaded)
    export_bundle(loaded, tmp_path / "b", cfg, ExportOptions("cuda", 32, NEW_TOKENS, 2), echo=lambda m: None)
    vlm = OnnxVLM(tmp_path / "b", provider="cuda", settings=ProviderSettings(cuda_graph=cuda_graph))
    assert vlm.bundle.provider == "CUDAExecutionProvider"
    images = [random_image(1), random_image(2, size=80)]
    logits: list[np.ndarray] = []
    inputs = vlm._pad_batch(vlm.encode(images, PROMPTS))
    ids = vlm.generate_ids(inputs, GenerationSettings(max_new_tokens=NEW_TOKENS), logits_out=logits)
    compress(loaded.model, cfg)
    pt = prepare_inputs(loaded.processor, loaded.adapter, images, PROMPTS, cfg)
    reference, reference_logits = reference_generate(loaded, pt, NEW_TOKENS)
    np.testing.assert_array_equal(ids, reference[:, : ids.shape[1]])
    assert ids.shape == reference.shape  # as many new tokens as PyTorch generated, not a prefix of them
    assert len(logits) >= 17, "generation stopped before 16 decode steps: pick prompts that do not hit EOS"
    for step in range(17):
        np.testing.assert_allclose(logits[step], reference_logits[step], atol=1e-3, rtol=0)
