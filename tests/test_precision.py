"""Bundle precision: float16 bundles, int8/int4 weights, scores in float32 whatever the dtype."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
import torch

from duet_export import GenerationSettings
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.export.check import check_bundle
from duet_export.export.precision import Precision
from duet_export.loading import load
from duet_export.runtimes import OnnxVLM

from conftest import bundle_config, random_image

PROMPT = "What digit is in row 2, column 3?"


def _export(tiny_dir, out, dtype=torch.float32, weights="float", target="cpu"):
    loaded = load(tiny_dir, dtype=dtype)
    options = ExportOptions(target, 32, 8, 1, Precision(weights, block_size=32))
    export_bundle(loaded, out, bundle_config(loaded), options, echo=lambda m: None)
    return out


@pytest.fixture(scope="module")
def precise(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return {
        "float32": _export(tiny_dir, root / "float32"),
        "float16": _export(tiny_dir, root / "float16", dtype=torch.float16),
        "int4": _export(tiny_dir, root / "int4", weights="int4"),
    }


def _run(vlm: OnnxVLM, image):
    inputs = vlm._pad_batch(vlm.encode([image], [PROMPT]))
    logits: list[np.ndarray] = []
    ids = vlm.generate_ids(inputs, GenerationSettings(max_new_tokens=4), logits_out=logits)
    return vlm.last_state.keep_index, logits[0][0].astype(np.float32), ids[0]


def test_stage1_scores_are_float32_in_a_float16_model(tiny_dir):
    loaded = load(tiny_dir, dtype=torch.float16)
    pixels = loaded.adapter.export_pixels(1, torch.float16)
    out = loaded.adapter.vision_layer(pixels, need_scores=True)
    assert out.hidden.dtype == torch.float16 and out.cls_attention.dtype == torch.float32


def test_a_float16_bundle_keeps_what_its_float32_twin_keeps(precise):
    """Scores run in float32 inside the float16 graphs: kept tokens agree except on near-ties (the
    benchmark `benchmarks/precision.py` measures the rate on 100 images), and logits stay close."""
    f32, f16 = OnnxVLM(precise["float32"], "cpu"), OnnxVLM(precise["float16"], "cpu")
    manifest = json.loads((precise["float16"] / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and f16.float_dtype is np.float16
    same = 0
    for seed in range(8):
        image = random_image(seed)
        kept32, logits32, _ = _run(f32, image)
        kept16, logits16, _ = _run(f16, image)
        if all(np.array_equal(kept16[k], kept32[k]) for k in kept32):
            same += 1
            np.testing.assert_allclose(logits16, logits32, atol=0.05 * np.abs(logits32).max())
    assert same >= 6, f"only {same} of 8 images kept the same tokens in float16"


def test_an_int4_bundle_is_smaller_runs_and_checks(precise):
    stored = {
        name: json.loads((precise[name] / "manifest.json").read_text())["weights_file"]["bytes"]
        for name in ("float32", "int4")
    }
    assert stored["int4"] < 0.5 * stored["float32"]  # the tiny vision tower stays float32
    manifest = json.loads((precise["int4"] / "manifest.json").read_text())
    assert manifest["weights"] == "int4" and manifest["graphs"]["prefill"]["passes"][0] == "quantize"
    ops = {
        name: Counter(n.op_type for n in ir.load(precise["int4"] / f"{name}.onnx").graph)
        for name in ("vision", "prefill", "step")
    }
    assert ops["prefill"]["MatMulNBits"] > 0 and ops["step"]["MatMulNBits"] > 0
    assert ops["vision"]["MatMulNBits"] == 2  # the projector's two linear layers, not the tower's
    assert ops["prefill"]["T2VDrop"] == 2  # the stage nodes are never quantized
    answer = OnnxVLM(precise["int4"], "cpu").generate([random_image(3)], [PROMPT])[0]
    assert len(answer.token_ids) >= 1
    assert all(r.ok for r in check_bundle(precise["int4"]))


def test_a_bfloat16_bundle_is_valid_and_refused_on_the_cpu(tiny_dir, tmp_path):
    from duet_export.errors import DuetError

    bundle = _export(tiny_dir, tmp_path / "bf16", dtype=torch.bfloat16, target="cuda")
    assert all(r.ok for r in check_bundle(bundle))  # strict type inference included
    vision = ir.load(bundle / "vision.onnx")
    assert vision.graph.inputs[0].dtype == ir.DataType.FLOAT  # numpy has no bfloat16: pixels in float32
    with pytest.raises(DuetError, match="bfloat16 bundle, which needs a GPU provider"):
        OnnxVLM(bundle, "cpu")


def test_cli_offers_the_weights_precision_knows():
    from duet_export import cli
    from duet_export.export.precision import WEIGHTS

    assert cli.WEIGHTS == WEIGHTS
