"""Shared fixtures: one tiny LLaVA checkpoint per session, saved and loaded back like a real one."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import transformers
from PIL import Image

from duet_export.loading import load
from duet_export.tiny import TinyLlavaSpec, build_tiny_llava

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", message="query=salient but no duet_query_mask")


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
