"""Generation with compression: KV cache, padding, sampling, and prompts as the processor writes them."""

import pytest
import torch

from duet_export.compression import compress
from duet_export.config import DuetConfig
from duet_export.generate import GenerationSettings, generate_answers
from duet_export.inputs import prepare_inputs

CONFIGS = [
    pytest.param(
        DuetConfig(dominant=20, contextual=6, drop_layers=(4, 6), keep_ratios=(0.5, 0.25)), id="both"
    ),
    pytest.param(
        DuetConfig(dominant=10, contextual=3, drop_layers=(2, 6), keep_ratios=(0.5, 0.0), query="all"),
        id="all",
    ),
    pytest.param(DuetConfig(drop_layers=(3,), keep_ratios=(0.3,), query="last"), id="stage2-last"),
    pytest.param(DuetConfig(dominant=16, contextual=4), id="stage1-only"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("batch", [1, 2])
def test_same_tokens_with_and_without_kv_cache(tiny, images, prompts, config, batch):
    compress(tiny.model, config)
    inputs = prepare_inputs(tiny.processor, tiny.adapter, images[:batch], prompts[:batch], config)
    with torch.no_grad():
        cached = tiny.model.generate(**inputs, max_new_tokens=16, do_sample=False)
        uncached = tiny.model.generate(**inputs, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_kv_cache_lengths_follow_layer_groups(tiny, images, prompts):
    config = DuetConfig(dominant=20, contextual=6, drop_layers=(4, 6), keep_ratios=(0.5, 0.25))
    compress(tiny.model, config)
    inputs = prepare_inputs(tiny.processor, tiny.adapter, images[:1], prompts[:1], config)
    with torch.no_grad():
        out = tiny.model(**inputs, use_cache=True)
    lengths = [out.cache.get_seq_length(i) for i in range(8)]
    t = inputs["input_ids"].shape[1]
    assert lengths == [t] * 4 + [t - 26 + 13] * 2 + [t - 26 + 6] * 2


def test_batched_answers_equal_single_answers(tiny, images, prompts):
    compress(tiny.model, budget=12)
    batched = generate_answers(tiny, images, prompts, GenerationSettings(max_new_tokens=10))
    single = [
        generate_answers(tiny, [i], [p], GenerationSettings(max_new_tokens=10))[0]
        for i, p in zip(images, prompts)
    ]
    assert [a.token_ids for a in batched] == [a.token_ids for a in single]


def test_sampling_is_seeded_and_cache_consistent(tiny, images, prompts):
    config = DuetConfig(dominant=20, contextual=6, drop_layers=(4, 6), keep_ratios=(0.5, 0.25))
    compress(tiny.model, config)
    inputs = prepare_inputs(tiny.processor, tiny.adapter, images, prompts, config)
    runs = []
    for use_cache in (True, False, True):
        torch.manual_seed(123)
        with torch.no_grad():
            runs.append(
                tiny.model.generate(
                    **inputs, max_new_tokens=12, do_sample=True, temperature=1.5, use_cache=use_cache
                )
            )
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    torch.manual_seed(7)
    with torch.no_grad():
        other = tiny.model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=1.5)
        greedy = tiny.model.generate(**inputs, max_new_tokens=12, do_sample=False)
        top1 = tiny.model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=1)
    assert not torch.equal(other, runs[0])
    assert torch.equal(top1, greedy) and not torch.equal(greedy, runs[0])


@pytest.mark.parametrize("positions", [None, "keep"])
def test_processor_prompts_are_shrunk_to_stage1_output(tiny, images, prompts, positions):
    """Prompts straight from the checkpoint's processor (N placeholders) give the same answer as ours (V)."""
    config = DuetConfig(
        dominant=20,
        contextual=6,
        drop_layers=(4, 6),
        keep_ratios=(0.5, 0.25),
        query="all",
        positions=positions,
    )
    compress(tiny.model, config)
    ours = prepare_inputs(tiny.processor, tiny.adapter, images, prompts, config)
    raw = prepare_inputs(tiny.processor, tiny.adapter, images, prompts, None)
    assert raw["input_ids"].shape[1] - ours["input_ids"].shape[1] == 64 - 26
    with torch.no_grad():
        a = tiny.model.generate(**ours, max_new_tokens=12, do_sample=False)
        b = tiny.model.generate(**raw, max_new_tokens=12, do_sample=False)
    assert torch.equal(a[:, -12:], b[:, -12:])
