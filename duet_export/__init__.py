"""duet-export: DUET-VLM token compression for Hugging Face VLMs, training with it, and ONNX export.

The Python API mirrors the command line:

    from duet_export import load, compress, resolve_budget
    lm = load("llava-1.5-7b-hf")
    compress(lm.model, budget=64)            # or compress(lm.model, DuetConfig(...))
    answers = generate_answers(lm, [image], ["What is in the picture?"])
"""

from duet_export.compress import compress, decompress, duet_config_of, is_compressed
from duet_export.config import DuetConfig, Geometry
from duet_export.errors import DuetError
from duet_export.generate import GenerationSettings, generate_answers
from duet_export.inputs import prepare_inputs
from duet_export.loading import load, load_image
from duet_export.stages.budget import report, resolve_budget

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
