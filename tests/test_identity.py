"""With compression off, or a budget that keeps every token, the model is the stock model."""

import pytest
import torch

from duet_export.compression import compress, decompress, is_compressed
from duet_export.config import DuetConfig
from duet_export.forward import DuetTrace
from duet_export.inputs import prepare_inputs
from duet_export.stages.budget import resolve_budget


def stock_logits(model, inputs):
    """The stock forward with the positions `generate()` would give it (padding-aware)."""
    mask = inputs["attention_mask"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        return model(**inputs, position_ids=pos).logits


KEEP_ALL = [
    pytest.param(DuetConfig(), id="off"),
    pytest.param(DuetConfig(drop_layers=(2, 5), keep_ratios=(1.0, 1.0)), id="stage2-keeps-all"),
    pytest.param("budget=N", id="budget-N"),
]


@pytest.mark.parametrize("config", KEEP_ALL)
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_logits_and_greedy_tokens(tiny, images, prompts, config, batch):
    if config == "budget=N":
        config = resolve_budget(tiny.adapter.num_patches, tiny.adapter.geometry())
    inputs = prepare_inputs(tiny.processor, tiny.adapter, images[:batch], prompts[:batch])
    ref = stock_logits(tiny.model, inputs)
    with torch.no_grad():
        ref_tokens = tiny.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    compress(tiny.model, config)
    assert is_compressed(tiny.model)
    trace = DuetTrace()
    with torch.no_grad():
        out = tiny.model(**inputs, duet_trace=trace).logits
        tokens = tiny.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-6, rtol=1e-6)
    assert torch.equal(tokens, ref_tokens)
    assert sorted(trace.keep_index) == list(config.drop_layers)  # a ratio of 1.0 runs the drop path too


def test_decompress_restores_stock_forward(tiny, images, prompts):
    inputs = prepare_inputs(tiny.processor, tiny.adapter, images[:1], prompts[:1])
    ref = stock_logits(tiny.model, inputs)
    compress(tiny.model, budget=10)
    decompress(tiny.model)
    assert not is_compressed(tiny.model)
    assert "forward" not in tiny.model.__dict__
    torch.testing.assert_close(stock_logits(tiny.model, inputs), ref, atol=0, rtol=0)


def test_compress_touches_only_its_instance(tiny_dir, tiny):
    from duet_export.loading import load

    other = load(tiny_dir)
    compress(tiny.model, budget=10)
    assert not is_compressed(other.model)


def test_api_names_stay_functions_after_their_modules_load():
    """`duet_export.compress` is the function even once the module that defines it is imported."""
    import importlib

    import duet_export

    for name, module in duet_export._LAZY.items():
        importlib.import_module(module)
        assert not isinstance(getattr(duet_export, name), type(duet_export)), name
