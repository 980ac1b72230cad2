"""Open a bundle: check its manifest, load its processor, start one onnxruntime session per graph."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from duet_export.errors import DuetError, one_line
from duet_export.export.manifest import bundle_file, read_manifest
from duet_export.processors import load_processor
from duet_export.runtimes.providers import ProviderSettings, select_providers
from duet_export.runtimes.threads import GLOBAL_POOL_REFUSAL, on_global_pool
from duet_export.runtimes.threads import session_options as pool_options

__all__ = ["Bundle", "available_memory", "bundle_session_options", "open_session", "run_named"]

GRAPHS = ("vision", "prefill", "step")


def open_session(
    path: str | os.PathLike,
    providers: list[tuple[str, dict[str, str]]],
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An `InferenceSession`, or a one-line `DuetError` (corrupt file, unsupported op, provider failure)."""
    options = options or pool_options()
    try:
        try:
            return ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # other code in this process made onnxruntime's process-wide pool
            if GLOBAL_POOL_REFUSAL not in str(e):
                raise
            return ort.InferenceSession(str(path), sess_options=on_global_pool(options), providers=providers)
    except Exception as e:  # onnxruntime raises several unrelated exception types
        raise DuetError(f"onnxruntime cannot load {Path(path).name}: {one_line(e)}") from None


def bundle_session_options(settings: ProviderSettings) -> ort.SessionOptions:
    """The `SessionOptions` a bundle's sessions get: its thread pool settings (see `runtimes.threads`) and,
    with `share_weights`, no per-session packed copies of the weights."""
    options = pool_options(settings.thread_pool, settings.threads)
    if settings.share_weights:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def run_named(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a session; its outputs by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed), strict=True))


@dataclass
class Bundle:
    """A bundle on disk, opened: manifest, processor and the three sessions."""

    root: Path
    manifest: dict[str, Any]
    processor: Any
    sessions: dict[str, ort.InferenceSession]
    provider: str
    settings: ProviderSettings
    pixel_dtype: type = np.float32  # what the vision graph takes pixels as

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        provider: str = "auto",
        settings: ProviderSettings | None = None,
        *,
        verify: str = "cached",
        session_options: ort.SessionOptions | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> Bundle:
        root = Path(path)
        manifest = read_manifest(root, verify=verify)
        providers = select_providers(provider, settings)
        if providers[0][0] == "MIGraphXExecutionProvider" and manifest["target"] != "migraphx":
            raise DuetError(
                f"{root} was exported for {manifest['target']}; MIGraphX needs a bundle exported with "
                "--target migraphx (lowered, static)"
            )
        try:
            processor = load_processor(root)
        except DuetError:
            raise
        except Exception as e:
            raise DuetError(f"{root}: cannot load the tokenizer/processor files: {one_line(e)}") from None
        # Only the step graph is replayed as a CUDA graph: vision and prefill run once per prompt.
        if manifest["dtype"] == "bfloat16" and providers[0][0] == "CPUExecutionProvider":
            raise DuetError(
                f"{root} is a bfloat16 bundle, which needs a GPU provider: onnxruntime's CPU provider has no "
                "bfloat16 kernels for most ops; export with --dtype float32 (or float16) for the CPU"
            )
        once = select_providers(provider, replace(settings, cuda_graph=False)) if settings else providers
        given = settings or ProviderSettings()
        if providers[0][0] == "CPUExecutionProvider" and not given.share_weights:
            given = _share_if_short_of_memory(manifest, given, on_note or (lambda message: None))
        sessions = {
            name: open_session(
                bundle_file(root, manifest["graphs"][name]["files"][0]),
                providers if name == "step" else once,
                session_options or bundle_session_options(given),
            )
            for name in GRAPHS
        }
        pixels = _pixel_dtype(root, manifest, sessions["vision"])
        return cls(root, manifest, processor, sessions, providers[0][0], given, pixels)


# Packed per-session copies of the weights (the CPU provider's default) measured 1.78x the weights resident
# on a real-width bundle, against 1.07x with the sessions reading the mapped file (docs/precision.md).
PACKED_RESIDENT_FACTOR = 1.8


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _share_if_short_of_memory(
    manifest: dict[str, Any], settings: ProviderSettings, on_note: Callable[[str], None]
) -> ProviderSettings:
    """Share the weights (no packed copy per session) when packed copies would not fit in the memory
    available: slower matrix products beat running out of memory. A note says so."""
    weights = sum(e["bytes"] for e in manifest["files"] if e["name"].endswith(".data"))
    available = available_memory()
    if available is None or weights * PACKED_RESIDENT_FACTOR <= available:
        return settings
    on_note(
        f"the bundle's weights ({weights / 2**30:.1f} GiB) packed once per session would need about "
        f"{weights * PACKED_RESIDENT_FACTOR / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available: "
        "the sessions share the mapped weights instead (as --share-weights; slower matrix products)"
    )
    return replace(settings, share_weights=True)


def _pixel_dtype(root: Path, manifest: dict[str, Any], vision: ort.InferenceSession) -> type:
    """The numpy type the vision graph takes pixels in; a one-line error if the manifest's dtype says
    otherwise (a bundle whose manifest and graphs disagree is not one we wrote)."""
    taken = {i.name: i.type for i in vision.get_inputs()}.get("pixel_values")
    expected = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(float)"}
    if taken != expected.get(manifest["dtype"]):
        raise DuetError(
            f"{root}: the manifest says {manifest['dtype']} but vision.onnx takes pixels as {taken}: the "
            "bundle's manifest and graphs disagree"
        )
    return np.float16 if taken == "tensor(float16)" else np.float32
