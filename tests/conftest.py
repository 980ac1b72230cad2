"""Shared fixtures: one tiny LLaVA checkpoint per session, saved and loaded back like a real one."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from PIL import Image

from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.loading import load
from duet_export.stages.budget import resolve_budget
from duet_export.tiny import TinyLlavaSpec, build_tiny_llava

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava", TinyLlavaSpec())


@pytest.fixture()
def tiny(tiny_dir):
    """A freshly loaded tiny model (tests may compress it freely)."""
    return load(tiny_dir)


def random_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


@pytest.fixture()
def images():
    return [random_image(1), random_image(2, size=80)]


PROMPTS = ["What digit is in row 2, column 3?", "How many 7s are in the image?"]


@pytest.fixture()
def prompts():
    return list(PROMPTS)


NEW_TOKENS = 32


def bundle_config(loaded):
    """~67 % reduction on the tiny model (N=64): 21 tokens on average, as the paper's 192 of 576."""
    return resolve_budget(21, loaded.adapter.geometry(), rules=loaded.adapter.rules)


@pytest.fixture(scope="session")
def bundles(tiny_dir, tmp_path_factory):
    """Three bundles: compressed (cpu, batch 2), compressed lowered (migraphx, batch 1), uncompressed (cpu)."""
    root = tmp_path_factory.mktemp("bundles")
    loaded = load(tiny_dir)
    cfg = bundle_config(loaded)
    quiet = lambda message: None  # noqa: E731
    export_bundle(loaded, root / "cpu", cfg, ExportOptions("cpu", 32, NEW_TOKENS, 2), echo=quiet)
    export_bundle(loaded, root / "migraphx", cfg, ExportOptions("migraphx", 32, NEW_TOKENS, 1), echo=quiet)
    export_bundle(loaded, root / "full", None, ExportOptions("cpu", 32, NEW_TOKENS, 2), echo=quiet)
    return root


def reference_generate(loaded, inputs, new_tokens: int):
    """Greedy PyTorch `generate()` -> (new token ids [B, n] as numpy, per-step logits as numpy)."""
    import torch

    with torch.no_grad():
        out = loaded.model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    ids = out.sequences[:, inputs["input_ids"].shape[1] :].numpy()
    return ids, [x.numpy() for x in out.logits]
