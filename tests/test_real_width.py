"""A model with LLaVA-1.5-7B's real widths (few decoder layers) through export: external data, bounded
memory, each weight stored once. Slow (a few minutes, ~5 GB of disk): `pytest -m slow`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_EXPORT = """
import json, resource, sys, torch
from duet_export.export.bundle import ExportOptions, export_bundle
from duet_export.export.precision import Precision
from duet_export.loading import load
from duet_export.stages.budget import resolve_budget
src, out, weights = sys.argv[1:4]
loaded = load(src, dtype=torch.float16)
size = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
config = resolve_budget(64, loaded.adapter.geometry(), rules=loaded.adapter.rules)
export_bundle(loaded, out, config, ExportOptions("cpu", 32, 8, 1, Precision(weights)), echo=lambda m: None)
print(json.dumps({"weights": size, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

_BUILD = """
import sys, torch
from dataclasses import replace
from duet_export.bench.shapes import SHAPES
from duet_export.tiny import build_tiny_llava
torch.set_default_dtype(torch.float16)  # as real checkpoints are saved; no float32 copy is ever built
build_tiny_llava(sys.argv[1], replace(SHAPES["llava-1.5-7b"], text_layers=4))
"""


@pytest.fixture(scope="module")
def real_width(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "llava-7b-widths-4l"
    subprocess.run([sys.executable, "-c", _BUILD, str(path)], check=True, capture_output=True)
    return path


def _export(src: Path, out: Path, weights: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _EXPORT, str(src), str(out), weights],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "weights,peak,size", [("float", 1.5, 1.1), ("int4", 1.5, 0.55)]
)  # the float16 vision tower stays: 0.51x
def test_real_width_export_fits_in_bounded_memory(real_width, tmp_path, weights, peak, size):
    from duet_export.export.check import check_bundle

    out = tmp_path / f"bundle-{weights}"
    measured = _export(real_width, out, weights)
    manifest = json.loads((out / "manifest.json").read_text())
    stored = sum(f["bytes"] for f in manifest["files"])
    assert measured["peak"] <= peak * measured["weights"], measured
    assert stored <= size * measured["weights"], (stored, measured)
    assert {f for g in manifest["graphs"].values() for f in g["files"]} >= {"weights.data"}
    assert all(r.ok for r in check_bundle(out))
