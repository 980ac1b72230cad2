"""The ONNX bundle against PyTorch DUET on the CPU provider: kept indices, logits, greedy tokens."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from duet_export import GenerationSettings, compress, prepare_inputs
from duet_export.export.check import check_bundle
from duet_export.forward import DuetTrace
from duet_export.loading import load
from duet_export.runtimes import OnnxVLM

from conftest import NEW_TOKENS, PROMPTS, bundle_config, random_image, reference_generate

STEPS = 17  # the prefill's logits + 16 decode steps


def _pytorch(tiny_dir, images, prompts, compressed: bool):
    loaded = load(tiny_dir)
    cfg = bundle_config(loaded) if compressed else None
    if compressed:
        compress(loaded.model, cfg)
    inputs = prepare_inputs(loaded.processor, loaded.adapter, images, prompts, cfg)
    return loaded, inputs


def _images(n):
    return [random_image(1), random_image(2, size=80)][:n]


@pytest.mark.parametrize("target", ["cpu", "migraphx", "cuda"])
def test_kept_indices_equal_pytorch(bundles, tiny_dir, target):
    batch = 1 if target == "migraphx" else 2
    vlm = OnnxVLM(bundles / target, provider="cpu")
    images, prompts = _images(batch), PROMPTS[:batch]
    inputs = vlm._pad_batch(vlm.encode(images, prompts))
    vlm.generate_ids(inputs, GenerationSettings(max_new_tokens=1))
    onnx_kept = vlm.last_state.keep_index

    loaded, pt_inputs = _pytorch(tiny_dir, images, prompts, compressed=True)
    real = pt_inputs["attention_mask"].sum(dim=1).tolist()
    for row, length in enumerate(real):  # the same tokens; the bundle pads to its fixed width
        np.testing.assert_array_equal(
            inputs["input_ids"][row, -length:], pt_inputs["input_ids"][row, -length:]
        )
    # Run PyTorch on exactly the bundle's (wider-padded) inputs so that indices compare one to one.
    pt_inputs = {
        "input_ids": torch.from_numpy(inputs["input_ids"][:batch]),
        "attention_mask": torch.from_numpy(inputs["attention_mask"][:batch]),
        "pixel_values": torch.from_numpy(inputs["pixel_values"][:batch]),
        "duet_query_mask": torch.from_numpy(inputs["query_mask"][:batch]),
    }
    trace = DuetTrace()
    with torch.no_grad():
        loaded.model(**pt_inputs, duet_trace=trace, use_cache=False, logits_to_keep=1)
    np.testing.assert_array_equal(onnx_kept["stage1_dominant"][:batch], trace.stage1.dominant.numpy())
    np.testing.assert_array_equal(onnx_kept["stage1_anchors"][:batch], trace.stage1.anchors.numpy())
    assert set(trace.keep_index) == {int(k.split(".")[1]) for k in onnx_kept if k.startswith("keep_index")}
    for layer, index in trace.keep_index.items():
        np.testing.assert_array_equal(onnx_kept[f"keep_index.{layer}"][:batch], index.numpy())


@pytest.mark.parametrize("target, batch", [("cpu", 1), ("cpu", 2), ("migraphx", 1), ("cuda", 2)])
def test_logits_and_greedy_tokens_equal_pytorch(bundles, tiny_dir, target, batch):
    vlm = OnnxVLM(bundles / target, provider="cpu")
    images, prompts = _images(batch), PROMPTS[:batch]
    inputs = vlm._pad_batch(vlm.encode(images, prompts))
    logits: list[np.ndarray] = []
    ids = vlm.generate_ids(inputs, GenerationSettings(max_new_tokens=NEW_TOKENS), logits_out=logits)[:batch]

    loaded, pt_inputs = _pytorch(tiny_dir, images, prompts, compressed=True)
    reference, reference_logits = reference_generate(loaded, pt_inputs, NEW_TOKENS)
    np.testing.assert_array_equal(ids, reference[:, : ids.shape[1]])
    assert ids.shape[1] == reference.shape[1]
    for step in range(min(STEPS, len(logits))):
        np.testing.assert_allclose(logits[step][:batch], reference_logits[step], atol=1e-4, rtol=0)
    assert len(logits) >= STEPS, "generation stopped before 16 decode steps: pick prompts that do not hit EOS"


def test_uncompressed_bundle_equals_stock_generate(bundles, tiny_dir):
    vlm = OnnxVLM(bundles / "full", provider="cpu")
    images = _images(2)
    answers = vlm.generate(images, PROMPTS, GenerationSettings(max_new_tokens=NEW_TOKENS))

    loaded = load(tiny_dir)  # stock transformers: never compressed
    inputs = loaded.processor(
        images=images,
        text=[_template(loaded, p) for p in PROMPTS],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    with torch.no_grad():
        out = loaded.model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id
        )
    for answer, row in zip(answers, out[:, inputs["input_ids"].shape[1] :], strict=True):
        tokens = row.tolist()
        eos = loaded.tokenizer.eos_token_id
        tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
        assert answer.token_ids == [t for t in tokens if t != loaded.tokenizer.pad_token_id]


def _template(loaded, prompt):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return loaded.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def test_lowered_bundle_passes_migraphx_verify_and_custom_op_bundle_does_not(bundles):
    assert all(r.ok for r in check_bundle(bundles / "migraphx"))
    reports = {r.graph: r for r in check_bundle(bundles / "cpu", "migraphx")}
    assert not reports["vision"].ok and not reports["prefill"].ok
    assert "duet.V2VMerge" in reports["vision"].format()


def test_cuda_bundle_runs_fused_attention_and_passes_cuda_verify(bundles, tiny_dir):
    """Every decoder and vision attention of the cuda bundle is one MultiHeadAttention node (the rest of
    each graph: standard ops), the op table accepts it for CUDA, and the migraphx bundle keeps plain ops."""
    import onnx_ir as ir

    layers = load(tiny_dir).adapter.geometry().num_layers
    fused = {}
    for graph in ("vision", "prefill", "step"):
        model = ir.load(bundles / "cuda" / f"{graph}.onnx")
        fused[graph] = sum(
            1 for n in model.graph if (n.domain, n.op_type) == ("com.microsoft", "MultiHeadAttention")
        )
        assert not [n for n in model.graph if n.domain not in ("", "com.microsoft")]
    assert fused["prefill"] == fused["step"] == layers and fused["vision"] > 0
    assert all(r.ok for r in check_bundle(bundles / "cuda"))
    lowered = ir.load(bundles / "migraphx" / "prefill.onnx")
    assert not [n for n in lowered.graph if n.domain]
    reports = {r.graph: r for r in check_bundle(bundles / "cuda", "migraphx")}
    assert "com.microsoft.MultiHeadAttention" in reports["prefill"].format()


def test_bundle_graphs_hold_single_duet_nodes_with_budgets(bundles, tiny_dir):
    import onnx_ir as ir

    cfg = bundle_config(load(tiny_dir))
    vision = ir.load(bundles / "cpu" / "vision.onnx")
    merges = [n for n in vision.graph if n.domain == "duet"]
    assert [n.op_type for n in merges] == ["V2VMerge"]
    attrs = {k: a.value for k, a in merges[0].attributes.items()}
    assert (attrs["dominant"], attrs["contextual"], attrs["cluster_width"]) == (
        cfg.dominant,
        cfg.contextual,
        cfg.cluster_width,
    )
    assert (merges[0].domain, merges[0].op_type, merges[0].overload) in vision.functions
    prefill = ir.load(bundles / "cpu" / "prefill.onnx")
    drops = [n for n in prefill.graph if n.domain == "duet"]
    assert [n.op_type for n in drops] == ["T2VDrop"] * len(cfg.drop_layers)
    assert [n.attributes["layer"].value for n in drops] == list(cfg.drop_layers)
    lowered = ir.load(bundles / "migraphx" / "prefill.onnx")
    assert not [n for n in lowered.graph if n.domain == "duet"] and not lowered.functions


def test_sampling_is_seeded(bundles):
    """The same seed gives the same answer, another seed another one, and top_k=1 is greedy decoding."""
    vlm = OnnxVLM(bundles / "cpu", provider="cpu")
    settings = GenerationSettings(
        max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=3
    )
    first = vlm.generate(_images(1), PROMPTS[:1], settings)[0].token_ids
    second = vlm.generate(_images(1), PROMPTS[:1], settings)[0].token_ids
    assert first == second and len(first) == 8
    other = vlm.generate(_images(1), PROMPTS[:1], replace(settings, seed=4))[0].token_ids
    assert other != first
    greedy = vlm.generate(_images(2), PROMPTS, GenerationSettings(max_new_tokens=8))
    top1 = vlm.generate(
        _images(2),
        PROMPTS,
        GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=1, seed=5),
    )
    assert [a.token_ids for a in top1] == [a.token_ids for a in greedy]
    assert len(greedy[0].token_ids) == 8


def test_io_binding_step_gives_the_same_tokens(bundles):
    """The fixed-buffer path that CUDA graphs use without the device cache, exercised on the CPU provider."""
    plain = OnnxVLM(bundles / "cpu", provider="cpu", device_cache=False)
    bound = OnnxVLM(bundles / "cpu", provider="cpu", io_binding=True, device_cache=False)
    assert bound._step_runner is not None
    settings = GenerationSettings(max_new_tokens=12)
    images = [random_image(1), random_image(2, size=80)]
    assert [a.token_ids for a in bound.generate(images, PROMPTS, settings)] == [
        a.token_ids for a in plain.generate(images, PROMPTS, settings)
    ]
