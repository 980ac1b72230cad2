"""Shared fixtures: one tiny LLaVA checkpoint per session, saved and loaded back like a real one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from duet_export.data.records import TrainingExample
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.forward import IGNORE_INDEX
from duet_export.loading import load
from duet_export.stages.budget import resolve_budget
from duet_export.tiny import TinyLlavaSpec, build_tiny_llava
from duet_export.training import VQACollator

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session", autouse=True)
def digest_cache(tmp_path_factory):
    """The runtime's cache of verified bundle files, kept out of the user's ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DUET_EXPORT_CACHE", str(path))
        yield path


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
    """Four bundles: compressed (cpu, batch 2), compressed lowered (migraphx, batch 1), compressed lowered with
    fused attention (cuda, batch 2), uncompressed (cpu)."""
    root = tmp_path_factory.mktemp("bundles")
    loaded = load(tiny_dir)
    cfg = bundle_config(loaded)
    quiet = lambda message: None  # noqa: E731
    export_bundle(loaded, root / "cpu", cfg, ExportOptions("cpu", 32, NEW_TOKENS, 2), echo=quiet)
    export_bundle(loaded, root / "migraphx", cfg, ExportOptions("migraphx", 32, NEW_TOKENS, 1), echo=quiet)
    export_bundle(loaded, root / "cuda", cfg, ExportOptions("cuda", 32, NEW_TOKENS, 2), echo=quiet)
    export_bundle(loaded, root / "full", None, ExportOptions("cpu", 32, NEW_TOKENS, 2), echo=quiet)
    return root


def reference_generate(loaded, inputs, new_tokens: int):
    """Greedy PyTorch `generate()` -> (new token ids [B, n] as numpy, per-step logits as numpy)."""

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


def _collate_conversation(loaded, conversation):
    """Collate one conversation and, for comparison, its first turn alone."""
    whole = VQACollator(loaded, None)([conversation])
    first = VQACollator(loaded, None)(
        [TrainingExample(conversation.id, conversation.image, *conversation.turns[0])]
    )
    return whole, first


def check_conversation_batch(loaded, conversation) -> str:
    """Labels on exactly every answer and its end token, the salient-query mask on every question and never
    on an answer, the image once: the first turn's tokens are those of training it alone. Returns the text."""
    whole, first = _collate_conversation(loaded, conversation)
    ids, labels, query = whole["input_ids"][0], whole["labels"][0], whole["duet_query_mask"][0]
    tok = loaded.tokenizer
    expected = [
        i
        for _, a in conversation.turns
        for i in [*tok(a, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    ]
    assert ids[labels != IGNORE_INDEX].tolist() == expected
    assert not (query & (labels != IGNORE_INDEX)).any()
    answer_starts = [
        i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX
    ]
    assert len(answer_starts) == len(conversation.turns)
    # every question has salient tokens between the previous answer and its own
    bounds = [0, *answer_starts]
    assert all(query[a:b].any() for a, b in itertools.pairwise(bounds))
    image_id = loaded.adapter.image_token_id
    assert int((ids == image_id).sum()) == int((first["input_ids"] == image_id).sum())
    prompt = first["input_ids"][0][first["attention_mask"][0] == 1]
    assert ids[whole["attention_mask"][0] == 1][: len(prompt)].tolist() == prompt.tolist()
    return tok.decode(ids[whole["attention_mask"][0] == 1].tolist())
