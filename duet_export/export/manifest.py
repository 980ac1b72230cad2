"""The bundle manifest: budgets, every graph's inputs and outputs, layer groups, positions rule, versions,
and every file of the bundle with its size and SHA-256.

A bundle is read back only through `read_manifest`, which refuses (one line) anything it cannot trust: a
missing or unreadable manifest, another format version, a missing key or a value of the wrong type, a file
name that leads outside the bundle or is not a plain file, a missing, truncated or (when digests are
checked) altered file.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from duet_export.errors import DuetError
from duet_export.export.digests import file_digest, verified_digest

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "bundle_file",
    "file_digest",
    "list_bundle_files",
    "position_mode",
    "read_manifest",
    "tool_versions",
]

FORMAT = "duet-export-bundle"
FORMAT_VERSION = 2  # 2: every file listed under "files" with its digest; graphs name theirs
MANIFEST = "manifest.json"
POSITIONS_RULE = (
    "positions count real tokens (padding gets 0) and are re-compacted after every Stage-2 drop; on a decode "
    "step the new token's position in a layer group is the number of real tokens in that group's cache"
)
VERIFY_MODES = ("sizes", "cached", "full")

# Keys the runtime reads, with the type each must have (a bool is not an int here).
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "target": str,
    "dtype": str,
    "batch": int,
    "prompt_length": int,
    "cache_capacity": list,
    "group_lengths": list,
    "layer_groups": list,
    "layer_group_of": list,
    "drop_layers": list,
    "decode_position_offsets": list,
    "budget": dict,
    "options": dict,
    "image": dict,
    "tokens": dict,
    "kv": dict,
    "graphs": dict,
    "files": list,
}
_REQUIRED_IMAGE = {
    "size": list,
    "channels": int,
    "frames": int,
    "tokens_per_image": int,
    "image_token_id": int,
}
_GRAPHS = ("vision", "prefill", "step")


def tool_versions() -> dict[str, str]:
    out = {}
    for pkg in ("duet-export", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def list_bundle_files(folder: Path) -> list[dict[str, Any]]:
    """Every file in `folder` but the manifest, with size and SHA-256: what a manifest records."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return [
        {"name": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in files
    ]


def bundle_file(root: Path, name: object) -> Path:
    """The bundle's file `name`: a relative path that resolves inside `root` to a plain file, or a one-line
    error (a manifest must never make us read or run a file elsewhere)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise DuetError(f"{root}: the manifest names a file {name!r} that is not a plain relative name")
    path = root / name
    resolved = path.resolve()
    if Path(name).is_absolute() or root.resolve() not in resolved.parents:
        raise DuetError(f"{root}: the manifest names {name!r}, which lies outside the bundle: refused")
    if not path.exists():
        raise DuetError(f"{root}: {name} is missing")
    if path.is_symlink() or not path.is_file():
        raise DuetError(f"{root}: {name} is not a plain file (a link or a folder): refused")
    return path


def _type_name(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _check_keys(where: str, table: dict, required: dict) -> None:
    for key, kind in required.items():
        if key not in table:
            raise DuetError(f"{where} has no {key!r}: the bundle is damaged; export it again")
        value = table[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise DuetError(f"{where}: {key!r} must be a {_type_name(kind)}, not {type(value).__name__}")


def position_mode(manifest: dict[str, Any]) -> str:
    """The bundle's `positions` choice: "compact" or "keep"; bundles written before the choice existed hold
    no `position_mode` and re-compact positions (Qwen2.5-VL ones kept them: their `positions` rule says so)."""
    mode = manifest.get("position_mode")
    if mode is None:
        return "keep" if manifest.get("family") == "qwen2.5-vl" else "compact"
    return mode


def _check_schema(path: Path, manifest: dict) -> None:
    _check_keys(str(path), manifest, _REQUIRED)
    mode = manifest.get("position_mode", "compact")
    if mode not in ("compact", "keep"):
        raise DuetError(f'{path}: \'position_mode\' must be "compact" or "keep", not {json.dumps(mode)[:40]}')
    _check_keys(f"{path} image", manifest["image"], _REQUIRED_IMAGE)
    if not isinstance(manifest["options"].get("max_new_tokens"), int):
        raise DuetError(f"{path}: options.max_new_tokens must be an integer")
    for name in _GRAPHS:
        graph = manifest["graphs"].get(name)
        if not isinstance(graph, dict) or not isinstance(graph.get("files"), list) or not graph["files"]:
            raise DuetError(f"{path}: the manifest lists no {name} graph file")
    for entry in manifest["files"]:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise DuetError(f"{path}: every entry of 'files' needs a name, bytes and sha256")


def read_manifest(bundle: str | os.PathLike, verify: str = "sizes") -> dict[str, Any]:
    """Load and check a bundle's manifest and files; every problem is a one-line `DuetError`.

    `verify`: "sizes" checks that every listed file is there with its size; "cached" also checks each
    SHA-256, remembering files already verified (same path, size, mtime and inode) so that reopening a
    bundle does not hash gigabytes again; "full" hashes every file whatever was remembered (`check`).
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}")
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
        versions = manifest.get("versions")
        made_by = versions.get("duet-export") if isinstance(versions, dict) else None
        raise DuetError(
            f"bundle format {version} (written by duet-export {made_by or 'an unknown version'}); this "
            f"duet-export reads format {FORMAT_VERSION}: export the model again"
        )
    _check_schema(path, manifest)
    listed = {}
    for entry in manifest["files"]:
        f = bundle_file(root, entry.get("name"))
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise DuetError(f"{root}: {entry['name']} has {size} bytes, the manifest says {entry['bytes']}")
        if verify != "sizes" and verified_digest(f, entry["sha256"], remember=verify == "cached") is None:
            raise DuetError(
                f"{root}: {entry['name']} does not match its checksum (SHA-256) in the manifest: altered or corrupt"
            )
        listed[entry["name"]] = entry
    for name in _GRAPHS:
        for file in manifest["graphs"][name]["files"]:
            if file not in listed:
                raise DuetError(f"{root}: the {name} graph's file {file!r} is not among the bundle's files")
    return manifest
