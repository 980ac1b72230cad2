"""Execution-provider selection: MIGraphX -> CUDA -> CPU by what this onnxruntime can run.

`auto` takes the first provider of that order that the installed onnxruntime offers (always with the CPU
provider behind it, for any node a GPU provider declines). Naming a provider that is not installed is a
one-line error that says which package brings it, never a silent fall-back to the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from duet_export.errors import DuetError

__all__ = ["PROVIDERS", "ProviderSettings", "available", "select_providers"]

PROVIDERS = {
    "migraphx": "MIGraphXExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_PACKAGES = {"migraphx": "onnxruntime-migraphx", "cuda": "onnxruntime-gpu", "cpu": "onnxruntime"}
AUTO_ORDER = ("migraphx", "cuda", "cpu")


@dataclass(frozen=True)
class ProviderSettings:
    """What a user may tune about a provider; each field maps onto that provider's own option."""

    device_id: int = 0
    fp16: bool = False  # MIGraphX: migraphx_fp16_enable
    cache_dir: str | None = None  # MIGraphX: compiled-model cache (ORT_MIGRAPHX_MODEL_CACHE_PATH)
    cuda_graph: bool = False  # CUDA: enable_cuda_graph (needs the static shapes a bundle has)
    # CUDA: use_tf32. onnxruntime turns TF32 on by default, which rounds fp32 matrix products to a 10-bit
    # mantissa: a float32 bundle then no longer matches the float32 model (PyTorch keeps TF32 off for
    # matrix products by default), and greedy tokens can flip. Off unless asked for.
    tf32: bool = False
    # Every provider: how the bundle's sessions share the CPU cores (`duet_export.runtimes.threads`):
    # "no-spin" (idle threads sleep), "global" (one process-wide pool) or "per-session" (onnxruntime's
    # spinning default); `threads` intra-op threads per pool, 0 for onnxruntime's choice.
    thread_pool: str = "no-spin"
    threads: int = 0
    # CPU: onnxruntime copies each MatMul weight into its own packed layout per session (prefill and step
    # each hold one), about doubling a bundle's resident memory over the memory-mapped weights.data.
    # share_weights turns that off (session.disable_prepacking): the sessions read the one mapped copy;
    # matrix products may be slower. docs/precision.md has the measurement.
    share_weights: bool = False


def available() -> list[str]:
    """Short names of the providers this onnxruntime offers, in `auto` order."""
    names = set(ort.get_available_providers())
    return [short for short in AUTO_ORDER if PROVIDERS[short] in names]


def _options(short: str, settings: ProviderSettings) -> dict[str, str]:
    if short == "migraphx":
        opts = {"device_id": str(settings.device_id), "migraphx_fp16_enable": str(int(settings.fp16))}
        if settings.cache_dir:
            Path(settings.cache_dir).mkdir(parents=True, exist_ok=True)
            # The provider reads its compiled-model cache location from the environment.
            os.environ["ORT_MIGRAPHX_MODEL_CACHE_PATH"] = settings.cache_dir
        return opts
    if short == "cuda":
        return {
            "device_id": str(settings.device_id),
            "enable_cuda_graph": str(int(settings.cuda_graph)),
            "use_tf32": str(int(settings.tf32)),
        }
    return {}


def select_providers(
    requested: str = "auto", settings: ProviderSettings | None = None
) -> list[tuple[str, dict[str, str]]]:
    """The `providers=` list for `onnxruntime.InferenceSession`: (name, options) pairs, CPU last."""
    settings = settings or ProviderSettings()
    offered = available()
    if requested == "auto":
        chosen = offered[0]
    elif requested in PROVIDERS:
        if requested not in offered:
            raise DuetError(
                f"{PROVIDERS[requested]} is not available in this onnxruntime "
                f"(it offers: {', '.join(offered)}); install {_PACKAGES[requested]} or use --provider cpu"
            )
        chosen = requested
    else:
        raise DuetError(f"unknown provider {requested!r} (choose from auto, {', '.join(PROVIDERS)})")
    out = [(PROVIDERS[chosen], _options(chosen, settings))]
    if chosen != "cpu":
        out.append((PROVIDERS["cpu"], {}))
    return out
