"""`export_bundle`: a loaded model + a budget -> a deployment bundle with every shape fixed.

The bundle holds three graphs (vision, decoder prefill, decoder step), the checkpoint's tokenizer, image
processor and chat template, and `manifest.json`. Writing is atomic: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from duet_export.config import DuetConfig
from duet_export.errors import DuetError
from duet_export.export.functions import FUNCTION_OPSET, attach_functions
from duet_export.export.graphs import PrefillGraph, StepGraph, VisionGraph
from duet_export.export.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    POSITIONS_RULE,
    list_bundle_files,
    tool_versions,
)
from duet_export.export.precision import Precision, dtype_name, weight_digests
from duet_export.export.weights import WEIGHTS_FILE, WeightStore
from duet_export.forward import DuetForward
from duet_export.loading import LoadedModel
from duet_export.outputs import BUNDLE, replace_folder
from duet_export.passes.pipeline import TARGETS, PassContext, run_pipeline
from duet_export.stages.budget import report

__all__ = ["ExportOptions", "export_bundle"]


@dataclass(frozen=True)
class ExportOptions:
    target: str = "cpu"
    max_prompt: int = 64  # text tokens of a prompt, image placeholders not counted
    max_new_tokens: int = 32
    batch: int = 1
    precision: Precision = field(default_factory=Precision)  # weight storage (the dtype is the model's)

    def validate(self, dtype: str | None = None) -> ExportOptions:
        """Check the options (and the weights against the target and `dtype`, when given)."""
        if self.target not in TARGETS:
            raise DuetError(f"unknown target {self.target!r} (choose from {', '.join(TARGETS)})")
        for name in ("max_prompt", "max_new_tokens", "batch"):
            if getattr(self, name) < 1:
                raise DuetError(f"{name.replace('_', '-')} must be at least 1")
        if dtype is not None:
            self.precision.validate(self.target, dtype)
        return self


def _describe(values: list[ir.Value]) -> list[dict[str, Any]]:
    return [
        {
            "name": v.name,
            "shape": [d if isinstance(d, int) else str(d) for d in v.shape],
            "dtype": v.dtype.name.lower(),
        }
        for v in values
    ]


def _export(
    module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str]
) -> ir.Model:
    """Dynamo export with the exporter's own console chatter captured (shown only if it fails)."""
    chatter = io.StringIO()
    # The exporter logs one warning per torchvision op it cannot register; torchvision is not a dependency.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), torch.no_grad():
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                opset_version=FUNCTION_OPSET,
                input_names=input_names,
                output_names=output_names,
                optimize=True,
                verbose=False,
            )
    except Exception as e:
        tail = " | ".join(chatter.getvalue().strip().splitlines()[-3:])
        raise DuetError(
            f"the ONNX exporter failed on {type(module).__name__}: {e.__class__.__name__}: {str(e).splitlines()[0][:200]} {tail}"
        ) from None
    return program.model


def _save(model: ir.Model, path: Path, store: WeightStore) -> str:
    """Write a graph, its large weights into the bundle's shared weights file; returns the path."""
    store.externalize(model)
    ir.save(model, path)
    return str(path)


def export_bundle(
    loaded: LoadedModel,
    out_dir: str | os.PathLike,
    config: DuetConfig | None,
    options: ExportOptions | None = None,
    echo: Callable[[str], None] = print,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Export `loaded` with `config` (None: the uncompressed baseline) to `out_dir`; returns the manifest.

    `out_dir` follows `duet_export.outputs`' rule: absent, empty, or (with `force`) an earlier bundle.
    """
    dtype = next(loaded.model.parameters()).dtype
    options = (options or ExportOptions()).validate(dtype_name(dtype))
    adapter = loaded.adapter
    geometry = adapter.geometry()
    config = config or DuetConfig()
    forward = DuetForward(loaded.model, adapter, config)
    budget = report(config, geometry)
    b = options.batch
    per_image = adapter.tokens_per_image(config)
    visual = per_image * geometry.frames
    length = options.max_prompt + visual
    group_lengths = [length - visual + v for v in [visual, *budget.group_tokens[1:]]]
    capacity = [t + options.max_new_tokens for t in group_lengths]
    text_cfg = adapter.text_config
    kv_heads = text_cfg.num_key_value_heads
    head_dim = adapter.attention_parts(adapter.decoder_layers[0]).head_dim
    image_size = adapter.image_size  # an int (square) or (height, width)
    height, width = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    hidden = text_cfg.hidden_size

    # numpy has no bfloat16: a bfloat16 bundle takes float32 pixels and casts them itself
    pixel = adapter.export_pixels(b * geometry.frames, torch.float32 if dtype == torch.bfloat16 else dtype)
    ids = torch.full((b, length), int(loaded.tokenizer.pad_token_id or 0), dtype=torch.long)
    ids[:, 1 : 1 + visual] = adapter.image_token_id
    stage1_names = list(adapter.stage1_output_names(config)) if config.stage1 else []
    stage1_extra = stage1_names[2:]  # beyond dominant, anchors: stage1_kept where positions are kept
    prefill_args = (
        ids,
        torch.ones_like(ids),
        torch.zeros((b, visual, hidden), dtype=dtype),
        torch.zeros_like(ids, dtype=torch.bool),
        # stage1_kept: which patch each placeholder holds (positions), one row per prompt
        *[torch.arange(visual).expand(b, -1).contiguous() for _ in stage1_extra],
    )
    groups = forward.groups
    layer_group = [g for g, (s, e) in enumerate(groups) for _ in range(s, e)]
    masks = [torch.ones((b, c), dtype=torch.long) for c in capacity]
    past = [
        torch.zeros((b, kv_heads, capacity[g], head_dim), dtype=dtype) for g in layer_group for _ in range(2)
    ]

    def kv_names(prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kv}" for i in range(len(layer_group)) for kv in ("key", "value")]

    drop_layers = [
        s for g, (s, _) in enumerate(groups) if g > 0 and budget.group_tokens[g] < budget.group_tokens[g - 1]
    ]

    graphs = {
        "vision": (
            VisionGraph(forward),
            (pixel,),
            ["pixel_values"],
            ["image_features", *stage1_names],
        ),
        "prefill": (
            PrefillGraph(forward),
            prefill_args,
            ["input_ids", "attention_mask", "image_features", "query_mask", *stage1_extra],
            ["logits", *kv_names("present"), *[f"keep_index.{layer}" for layer in drop_layers]],
        ),
        "step": (
            StepGraph(forward),
            (ids[:, :1], *masks, *past),
            ["input_ids", *[f"past_mask.{g}" for g in range(len(groups))], *kv_names("past")],
            ["logits", *kv_names("new")],
        ),
    }
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": tool_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": str(loaded.path),
        "family": adapter.family,
        "target": options.target,
        "opset": FUNCTION_OPSET,
        "dtype": dtype_name(dtype),
        "weights": options.precision.weights,
        "compressed": config.enabled,
        "config": config.to_dict(),
        "budget": budget.to_dict(),
        "options": asdict(options),
        "batch": b,
        "prompt_length": length,
        "image": {
            "size": [height, width],
            "channels": 3,
            # pixel_values holds `pixel_rows` rows of `pixel_shape` per image (LLaVA: 1 x [3, H, W];
            # Qwen2.5-VL: the processor's S patch rows of 1176 values)
            "pixel_rows": pixel.shape[0] // (b * geometry.frames),
            "pixel_shape": list(pixel.shape[1:]),
            "media": adapter.media,
            "frames": geometry.frames,
            "patches": geometry.num_patches,
            "tokens_per_image": per_image,
            "image_token_id": adapter.image_token_id,
            "preprocessing": adapter.preprocessing,
        },
        "layer_groups": [list(g) for g in groups],
        "layer_group_of": layer_group,
        "group_lengths": group_lengths,
        "cache_capacity": capacity,
        "drop_layers": drop_layers,
        "kv": {"num_kv_heads": kv_heads, "head_dim": head_dim},
        "position_mode": "keep" if forward.keep else "compact",  # absent in older bundles: compact
        "positions": adapter.positions_rule
        or (adapter.keep_positions_rule if forward.keep else POSITIONS_RULE),
        "decode_position_offsets": [
            adapter.decode_position_offset(v, forward.keep) for v in forward.cached_visual
        ],
        "tokens": {
            "eos_token_id": loaded.tokenizer.eos_token_id,
            "pad_token_id": loaded.tokenizer.pad_token_id,
        },
        "graphs": {},
    }
    # the vision graph quantizes the projector (and the tower with --quantize-vision), the decoder graphs
    # every linear layer
    parts = adapter.parameter_groups()
    chosen = parts["projector"] + (parts["vision"] if options.precision.quantize_vision else [])
    quantized = {"vision": weight_digests(chosen)}
    with replace_folder(out_dir, BUNDLE, force=force, inputs=[loaded.path]) as tmp:
        store = WeightStore(tmp)
        for name, (module, args, inputs, outputs) in graphs.items():
            start = time.perf_counter()
            echo(f"exporting the {name} graph ...")
            model = _export(module, args, inputs, outputs)
            attach_functions(model)
            context = PassContext(
                options.target, name, options.precision.quantize(options.target), quantized.get(name)
            )
            path = tmp / f"{name}.onnx"
            # saved before `verify`, which then checks the file: no second copy of the weights in memory
            model, applied, reports = run_pipeline(
                model, context, save=lambda done, path=path: _save(done, path, store)
            )
            files = [path.name, WEIGHTS_FILE] if store.size else [path.name]
            failed = [r for r in reports if not r.ok]
            if failed:
                raise DuetError(
                    f"the {name} graph fails verification for {options.target}: "
                    + failed[0].format().replace("\n", " | ")
                )
            manifest["graphs"][name] = {
                "files": files,
                "inputs": _describe(list(model.graph.inputs)),
                "outputs": _describe(list(model.graph.outputs)),
                "passes": applied,
                "duet_nodes": sorted({f"{n.domain}.{n.op_type}" for n in model.graph if n.domain == "duet"}),
                "nodes": len(model.graph),
            }
            echo(
                f"  {name}: {len(model.graph)} nodes, passes {', '.join(applied)} ({time.perf_counter() - start:.1f} s)"
            )
        loaded.processor.save_pretrained(tmp)
        manifest["weights_file"] = {"bytes": store.written, "referenced_bytes": store.referenced}
        manifest["files"] = list_bundle_files(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
