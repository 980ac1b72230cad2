"""`duet-export bench` end to end on the tiny model (figures are not asserted: these machines are noisy)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from duet_export.bench.flops import prefill_flops
from duet_export.cli import cli
from duet_export.loading import load
from duet_export.stages.budget import resolve_budget


def test_bench_writes_table_json_and_chart(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    args = [str(tiny_dir), "--budget", "7", "--out", str(out), "--repeats", "1", "--warmup", "0", "--no-memory",
            "--no-sweep", "--decode-tokens", "2"]  # fmt: skip
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["full", "budget 7"]
    full, duet = data["rows"]
    assert duet["reduction"] > 0.85 and duet["flop_ideal_speedup"] > 1
    assert duet["kv_bytes_prefill"] < full["kv_bytes_prefill"]
    for key in ("onnx_vision", "onnx_prefill", "onnx_ttft", "onnx_decode", "eager_ttft", "eager_decode"):
        assert duet["timings"][key]["median"] > 0
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


def test_bench_needs_a_source():
    result = CliRunner().invoke(cli, ["bench"])
    assert result.exit_code == 2 and "--shape" in result.stderr
    result = CliRunner().invoke(cli, ["bench", "--shape", "nope"])
    assert result.exit_code == 2 and "known shape" in result.stderr
