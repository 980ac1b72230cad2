"""duet-export: DUET-VLM token compression for Hugging Face VLMs, training with it, and ONNX export.

The Python API mirrors the command line:

    from duet_export import load, compress, resolve_budget
    lm = load("llava-1.5-7b-hf")
    compress(lm.model, budget=64)            # or compress(lm.model, DuetConfig(...))
    answers = generate_answers(lm, [image], ["What is in the picture?"])
"""

from importlib import import_module
from typing import TYPE_CHECKING

# Attributes load on first use, so that `duet_export.runtimes` (onnxruntime only) imports without torch.
_LAZY = {
    "compress": "duet_export.compression",
    "decompress": "duet_export.compression",
    "duet_config_of": "duet_export.compression",
    "is_compressed": "duet_export.compression",
    "DuetConfig": "duet_export.config",
    "Geometry": "duet_export.config",
    "DuetError": "duet_export.errors",
    "GenerationSettings": "duet_export.answers",
    "generate_answers": "duet_export.generate",
    "prepare_inputs": "duet_export.inputs",
    "load": "duet_export.loading",
    "load_image": "duet_export.loading",
    "report": "duet_export.stages.budget",
    "resolve_budget": "duet_export.stages.budget",
}

if TYPE_CHECKING:
    from duet_export.answers import GenerationSettings
    from duet_export.compression import compress, decompress, duet_config_of, is_compressed
    from duet_export.config import DuetConfig, Geometry
    from duet_export.errors import DuetError
    from duet_export.generate import generate_answers
    from duet_export.inputs import prepare_inputs
    from duet_export.loading import load, load_image
    from duet_export.stages.budget import report, resolve_budget


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'duet_export' has no attribute {name!r}")


__all__ = [
    "DuetConfig",
    "DuetError",
    "GenerationSettings",
    "Geometry",
    "compress",
    "decompress",
    "duet_config_of",
    "generate_answers",
    "is_compressed",
    "load",
    "load_image",
    "prepare_inputs",
    "report",
    "resolve_budget",
]
__version__ = "0.1.0"
