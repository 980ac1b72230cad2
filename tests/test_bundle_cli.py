"""Bundles from the command line: export, run, check, passes list — and one-line errors on bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from duet_export.cli import cli
from duet_export.runtimes import providers

from conftest import random_image


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture()
def copy(bundles, tmp_path):
    """A writable copy of the compressed CPU bundle."""
    return shutil.copytree(bundles / "cpu", tmp_path / "bundle")


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "img.png"
    random_image(5, size=64).save(path)
    return path


def test_export_cli_writes_a_bundle_and_run_answers(tiny_dir, tmp_path, image_file):
    out = tmp_path / "b"
    result = run("export", tiny_dir, out, "--budget", 10, "--max-prompt", 24, "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["budget"]["average_tokens"] <= 10 and manifest["compressed"]
    assert {f for g in manifest["graphs"].values() for f in g["files"]} == {
        "vision.onnx",
        "prefill.onnx",
        "step.onnx",
        "weights.data",  # one weights file: each distinct tensor stored once
    }
    shared = manifest["weights_file"]
    assert shared["bytes"] < 0.6 * shared["referenced_bytes"]  # prefill and step share the decoder
    listed = {f["name"] for f in manifest["files"]}
    assert listed == {p.name for p in out.iterdir()} - {"manifest.json"}  # every file, with its digest
    for name in ("tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (out / name).is_file() and name in listed, name
    result = run("run", out, "--image", image_file, "--prompt", "What digit is in row 2?")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1]  # the answer is the last line
    assert "CPUExecutionProvider" in result.stderr


def test_check_and_passes_list(bundles):
    result = run("check", bundles / "migraphx")
    assert result.exit_code == 0, result.output
    assert "all 3 graphs pass for migraphx" in result.stdout
    result = run("check", bundles / "cpu", "--target", "migraphx")
    assert result.exit_code == 1 and "duet.T2VDrop" in result.stdout
    result = run("passes", "list")
    assert result.exit_code == 0 and "lower -> fix-shapes -> upcast -> cleanup -> verify" in result.stdout


def test_failed_export_leaves_nothing_behind(tiny_dir, tmp_path, monkeypatch):
    import duet_export.export.bundle as bundle

    def broken(*args, **kwargs):
        raise bundle.DuetError("simulated failure")

    monkeypatch.setattr(bundle, "run_pipeline", broken)
    result = run("export", tiny_dir, tmp_path / "out", "--budget", 10)
    one_line_error(result, "simulated failure")
    assert list(tmp_path.iterdir()) == []


def test_export_needs_a_budget_or_no_compress(tiny_dir, tmp_path):
    one_line_error(run("export", tiny_dir, tmp_path / "x"), "--budget")
    one_line_error(run("export", tiny_dir, tmp_path / "x", "--budget", 10, "--no-compress"), "exclude")
    one_line_error(run("export", tiny_dir, tmp_path / "x", "--budget", 10, "--batch", 0), "batch")


def test_missing_graph_file(copy, image_file):
    (copy / "step.onnx").unlink()
    one_line_error(run("run", copy, "--image", image_file, "--prompt", "hi"), "step.onnx is missing")


def test_corrupt_graph_file(copy, image_file):
    path = copy / "prefill.onnx"
    data = bytearray(path.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # same size, garbage inside
    path.write_bytes(bytes(data))
    one_line_error(run("run", copy, "--image", image_file, "--prompt", "hi"), "prefill.onnx")
    result = run("check", copy)
    one_line_error(result, "checksum")


def test_truncated_graph_file(copy, image_file):
    path = copy / "vision.onnx"
    path.write_bytes(path.read_bytes()[:100])
    one_line_error(run("run", copy, "--image", image_file, "--prompt", "hi"), "vision.onnx has 100 bytes")


def test_manifest_from_another_version(copy, image_file):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(
        run("run", copy, "--image", image_file, "--prompt", "hi"), "format 99", "export the model again"
    )
    (copy / "manifest.json").write_text("{not json")
    one_line_error(run("run", copy, "--image", image_file, "--prompt", "hi"), "corrupt")


def test_not_a_bundle(tmp_path, image_file):
    one_line_error(run("run", tmp_path, "--image", image_file, "--prompt", "hi"), "not a duet-export bundle")


def test_prompt_longer_than_max_prompt(bundles, image_file):
    long = " ".join(["digit"] * 80)
    one_line_error(run("run", bundles / "cpu", "--image", image_file, "--prompt", long), "--max-prompt")


def test_image_of_another_size_or_mode_is_converted_with_a_note(bundles, tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray((np.random.default_rng(0).random((90, 120)) * 255).astype("uint8"), mode="L").save(path)
    result = run("run", bundles / "cpu", "--image", path, "--prompt", "What digit?", "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    assert "note: image mode L converted to RGB" in result.stderr
    assert "note: image 120x90 resized to the bundle's 64x64" in result.stderr


def test_high_bit_depth_image_is_refused(bundles, tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 65535).astype("uint16")).save(path)
    one_line_error(run("run", bundles / "cpu", "--image", path, "--prompt", "hi"), "refused")


def test_not_an_image(bundles, tmp_path):
    path = tmp_path / "x.png"
    path.write_text("not an image")
    one_line_error(run("run", bundles / "cpu", "--image", path, "--prompt", "hi"), "not an image")


def test_absent_provider(bundles, image_file, monkeypatch):
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    one_line_error(
        run("run", bundles / "cpu", "--image", image_file, "--prompt", "hi", "--provider", "cuda"),
        "CUDAExecutionProvider is not available",
        "onnxruntime-gpu",
    )
    one_line_error(
        run("run", bundles / "cpu", "--image", image_file, "--prompt", "hi", "--provider", "migraphx"),
        "onnxruntime-migraphx",
    )


def test_a_bundle_not_exported_for_migraphx_is_refused_on_migraphx(bundles, image_file, monkeypatch):
    """MIGraphX needs the lowered, static graphs of `--target migraphx`: a cpu bundle is refused before any
    session opens, from the CLI and from the Python API."""
    from duet_export.errors import DuetError
    from duet_export.runtimes import OnnxVLM

    offered = ["MIGraphXExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: offered)
    one_line_error(
        run("run", bundles / "cpu", "--image", image_file, "--prompt", "hi", "--provider", "migraphx"),
        "was exported for cpu",
        "--target migraphx",
    )
    with pytest.raises(DuetError, match="exported for cpu; MIGraphX needs a bundle exported with --target"):
        OnnxVLM(bundles / "cpu", provider="auto")  # auto picks MIGraphX when it is offered


def test_more_new_tokens_than_the_bundle_holds(bundles, image_file):
    one_line_error(
        run("run", bundles / "cpu", "--image", image_file, "--prompt", "hi", "--max-new-tokens", 999),
        "--max-new-tokens",
    )


def test_runtime_needs_no_torch(bundles, image_file):
    """A deployment needs onnxruntime, tokenizers and Pillow only: the runtime imports and answers without torch."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # as if torch were not installed
        "from duet_export.runtimes import OnnxVLM\n"
        f"print(repr(OnnxVLM({str(bundles / 'cpu')!r}, 'cpu').answer({str(image_file)!r}, 'What digit?', max_new_tokens=2)))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' and sys.modules[m] is not None))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
