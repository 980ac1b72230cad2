"""`check_bundle`: verify a bundle on disk (files, checksums, every graph) against a target's rules."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from duet_export.errors import DuetError
from duet_export.export.manifest import bundle_file, read_manifest
from duet_export.passes.pipeline import TARGETS
from duet_export.passes.verify import VerifyPass, VerifyReport

__all__ = ["check_bundle"]


def check_bundle(bundle: str | os.PathLike, target: str | None = None) -> list[VerifyReport]:
    """One verify report per graph; bad files and manifests are one-line `DuetError`s.

    Every file the manifest lists (graphs, weights, tokenizer, processor, chat template) is hashed and
    compared with its SHA-256, whatever the runtime's cache of verified files remembers.
    """
    root = Path(bundle)
    manifest = read_manifest(root, verify="full")
    target = target or manifest["target"]
    if target not in TARGETS:
        raise DuetError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    reports = []
    for name, graph in manifest["graphs"].items():
        path = bundle_file(root, graph["files"][0])
        try:
            model = ir.load(path)
        except Exception as e:
            raise DuetError(f"{path} cannot be read as ONNX ({e.__class__.__name__})") from None
        verify = VerifyPass(target, graph_name=name, path=str(path))
        verify(model)
        reports.append(verify.report)
    return reports
