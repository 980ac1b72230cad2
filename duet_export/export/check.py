"""`check_bundle`: verify a bundle on disk (files, checksums, every graph) against a target's rules."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from duet_export.errors import DuetError
from duet_export.export.manifest import read_manifest
from duet_export.passes.pipeline import TARGETS
from duet_export.passes.verify import VerifyPass, VerifyReport

__all__ = ["check_bundle"]


def check_bundle(bundle: str | os.PathLike, target: str | None = None) -> list[VerifyReport]:
    """One verify report per graph; bad files and manifests are one-line `DuetError`s."""
    root = Path(bundle)
    manifest = read_manifest(root, verify_digests=True)
    target = target or manifest["target"]
    if target not in TARGETS:
        raise DuetError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    reports = []
    for name, graph in manifest["graphs"].items():
        path = root / graph["files"][0]["name"]
        try:
            model = ir.load(path)
        except Exception as e:
            raise DuetError(f"{path} cannot be read as ONNX ({e.__class__.__name__})") from None
        verify = VerifyPass(target, graph_name=name)
        verify(model)
        reports.append(verify.report)
    return reports
