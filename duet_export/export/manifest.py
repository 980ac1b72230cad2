"""The bundle manifest: budgets, every graph's inputs and outputs, layer groups, positions rule, versions.

A bundle is read back only through `read_manifest`, which refuses (one line) anything it cannot trust:
a missing or unreadable manifest, another format version, a missing or truncated graph file.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from duet_export.errors import DuetError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "file_digest", "read_manifest", "tool_versions"]

FORMAT = "duet-export-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
POSITIONS_RULE = (
    "positions count real tokens (padding gets 0) and are re-compacted after every Stage-2 drop; on a decode "
    "step the new token's position in a layer group is the number of real tokens in that group's cache"
)


def tool_versions() -> dict[str, str]:
    out = {}
    for pkg in ("duet-export", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle: str | os.PathLike, verify_digests: bool = False) -> dict[str, Any]:
    """Load and check a bundle's manifest; every problem is a one-line `DuetError`."""
    root = Path(bundle)
    if not root.is_dir():
        raise DuetError(f"{root}: no such bundle directory")
    path = root / MANIFEST
    if not path.is_file():
        raise DuetError(f"{root} is not a duet-export bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DuetError(f"{path} is corrupt ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DuetError(f"{path} is not a duet-export bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        made_by = manifest.get("versions", {}).get("duet-export", "an unknown version")
        raise DuetError(
            f"bundle format {version} (written by duet-export {made_by}); this duet-export reads format "
            f"{FORMAT_VERSION}: export the model again"
        )
    for name, graph in manifest.get("graphs", {}).items():
        for file in graph.get("files", []):
            f = root / file["name"]
            if not f.is_file():
                raise DuetError(f"{root}: {name} graph file {file['name']} is missing")
            if f.stat().st_size != file["bytes"]:
                raise DuetError(
                    f"{root}: {file['name']} has {f.stat().st_size} bytes, the manifest says {file['bytes']}"
                )
            if verify_digests and file_digest(f) != file["sha256"]:
                raise DuetError(f"{root}: {file['name']} does not match its checksum (corrupt)")
    return manifest
