"""`duet-export bench` end to end on the tiny model (figures are not asserted: these machines are noisy)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from duet_export.bench.flops import prefill_flops
from duet_export.cli import cli
from duet_export.loading import load
from duet_export.stages.budget import resolve_budget

from conftest import PROMPTS, random_image


def test_bench_writes_table_json_and_chart(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    args = [str(tiny_dir), "--budget", "7", "--out", str(out), "--repeats", "2", "--warmup", "0", "--no-memory",
            "--no-sweep", "--decode-tokens", "2"]  # fmt: skip
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["full", "budget 7"]
    full, duet = data["rows"]
    assert duet["reduction"] > 0.85 and duet["flop_ideal_speedup"] > 1
    assert duet["kv_bytes_prefill"] < full["kv_bytes_prefill"]
    for key in ("vision", "prefill", "ttft", "decode"):
        for side in ("onnx", "eager"):
            assert duet["timings"][f"{side}_{key}"]["median"] > 0
    # each backend timed in its own process, progress shown as rounds done of total
    assert set(data["backends"]) == {
        "onnxruntime",
        "onnxruntime (per-session pools)",
        "PyTorch eager (OpenMP passive)",
        "PyTorch eager (OpenMP active)",
    }
    # the repeats split over two passes, the backends' processes taking turns
    assert "timing onnxruntime (2 configurations, own process pass 2/2)" in result.output
    assert "PyTorch eager (OpenMP active): round 1/1" in result.output
    assert all(b["passes"] == 2 for b in data["backends"].values())
    # the ratios take the faster eager setting
    t = duet["backends"]
    best = min(
        t["PyTorch eager (OpenMP passive)"]["ttft"]["median"],
        t["PyTorch eager (OpenMP active)"]["ttft"]["median"],
    )
    assert duet["timings"]["eager_ttft"]["median"] == best
    # the same tokens on both sides: the bundles are exported exactly as wide as the prompt
    for row in data["rows"]:
        assert len(set(row["decoder_tokens"].values())) == 1
    assert full["decoder_tokens"]["onnxruntime"] > duet["decoder_tokens"]["onnxruntime"]
    # eager's decoder is timed directly, within the same forward as its vision
    t = duet["timings"]
    assert t["eager_vision"]["median"] + t["eager_prefill"]["median"] == pytest.approx(
        t["eager_ttft"]["median"]
    )
    assert "Targets (issue 20)" in (out / "bench.md").read_text()
    assert 0 < duet["stage_share_custom_op"]["share"] < 1 and 0 < duet["stage_share_lowered"]["share"] < 1
    assert (out / "bench.png").stat().st_size > 0 and "FLOP-ideal" in (out / "bench.md").read_text()
    # a second run reuses the bundles instead of exporting again
    again = CliRunner().invoke(cli, ["bench", *args])
    assert again.exit_code == 0 and "exporting" not in again.output


def test_flops_follow_the_kept_tokens(tiny_dir):
    loaded = load(tiny_dir)
    geometry = loaded.adapter.geometry()
    full = prefill_flops(loaded.adapter, None, 32)
    duet = prefill_flops(loaded.adapter, resolve_budget(7, geometry, rules=loaded.adapter.rules), 32)
    assert duet.decoder < full.decoder and duet.vision < full.vision


def test_order_effect_compares_forward_and_reversed_rounds():
    from duet_export.bench.timings import order_effect

    assert order_effect([1.0, 1.2, 1.0, 1.2], [0, 1, 0, 1]) == pytest.approx(0.2 / 1.1)
    assert order_effect([1.0, 1.0], [0, 0]) is None  # no reversed round: nothing to compare


def test_bench_needs_a_source():
    result = CliRunner().invoke(cli, ["bench"])
    assert result.exit_code == 2 and "--shape" in result.stderr
    result = CliRunner().invoke(cli, ["bench", "--shape", "nope"])
    assert result.exit_code == 2 and "known shape" in result.stderr


def test_shared_weights_are_an_extra_onnxruntime_backend_and_memory_kind(bundles, tmp_path):
    from duet_export.bench.processes import peak_memory
    from duet_export.bench.settings import BenchSettings, onnx_variants

    settings = BenchSettings(share_weights=True)
    variants = onnx_variants(settings)
    assert [v.label(settings) for v in variants][-1] == "onnxruntime (shared weights)"
    assert sum(v.share_weights for v in variants) == 1
    image = tmp_path / "image.png"
    random_image(1).save(image)
    peak = peak_memory("onnx-shared", bundles / "cpu", PROMPTS[0], image, None)
    assert peak is not None and peak > 0
