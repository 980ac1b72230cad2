"""The command line: JSON from inspect, the overlay, and one-line errors with exit code 2 on bad input."""

import json

import pytest
from click.testing import CliRunner

from duet_export.cli import cli

from conftest import random_image


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "img.png"
    random_image(5, size=96).save(path)
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_inspect_json_reports_both_stages(tiny_dir, image_file):
    result = run(
        "inspect",
        tiny_dir,
        "--image",
        image_file,
        "--prompt",
        "What digit is in row 2?",
        "--budget",
        10,
        "--json",
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    s1 = info["stage1"]
    assert s1["cls"] and s1["tokens"] == 1 + len(s1["dominant"]) + len(s1["contextual"])
    assert s1["dominant"] == sorted(s1["dominant"])
    merged = [p for c in s1["contextual"] for p in [c["anchor"], *c["members"]]]
    assert not set(merged) & set(s1["dominant"]) and len(set(merged)) == len(merged)
    assert [d["layer"] for d in info["stage2"]] == [4, 6]
    first = info["stage2"][0]["kept"]
    assert len(first) == int(0.5 * s1["tokens"]) and first == sorted(first)
    assert info["stage2"][1]["kept"] == []
    assert info["average_tokens"] <= 10
    assert info["queries"] == ["what", "digit", "row", "2", "?", ":"]


def test_inspect_overlay_png(tiny_dir, image_file, tmp_path):
    out = tmp_path / "sub" / "overlay.png"
    result = run(
        "inspect",
        tiny_dir,
        "--image",
        image_file,
        "--prompt",
        "Where is it?",
        "--budget",
        12,
        "--overlay",
        out,
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overlay written" in result.stdout
    assert [p.name for p in out.parent.iterdir()] == ["overlay.png"]  # no temporary left behind


def test_inspect_overlay_lights_the_kept_patches(tiny_dir, image_file, tmp_path, monkeypatch):
    """Each panel of the overlay shows the model's view at full brightness on the patches a stage kept as
    tokens (dominant patches, anchors), at 0.55 on patches merged into a kept contextual token and at 0.2
    elsewhere, on the 8 x 8 grid of 8-px patches; which is which comes from inspect's JSON."""
    import matplotlib.axes
    import numpy as np

    shown: list[np.ndarray] = []
    imshow = matplotlib.axes.Axes.imshow

    def recording(ax, data, *args, **kwargs):
        shown.append(np.array(data))
        return imshow(ax, data, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", recording)
    out = tmp_path / "overlay.png"
    args = ["--prompt", "Where is it?", "--budget", 12, "--json", "--overlay", out]
    result = run("inspect", tiny_dir, "--image", image_file, *args)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    view, stage1, *drops = shown
    assert view.shape[:2] == (64, 64) and len(drops) == len(info["stage2"]) == 2
    s1 = info["stage1"]
    members = {c["anchor"]: c["members"] for c in s1["contextual"]}

    def expected(tokens: list[str]) -> np.ndarray:
        level = np.full(64, 0.2)
        for kind, _, index in (t.partition(":") for t in tokens):
            if kind == "context":
                level[members[int(index)]] = 0.55
        for kind, _, index in (t.partition(":") for t in tokens):
            if kind in ("patch", "context"):
                level[int(index)] = 1.0
        return level

    def lit(panel: np.ndarray) -> np.ndarray:
        """The brightness of each patch: which of the three levels reproduces its pixels."""
        level = np.full(64, np.nan)
        for p in range(64):
            r, c = divmod(p, 8)
            block, seen = (
                panel[8 * r : 8 * r + 8, 8 * c : 8 * c + 8],
                view[8 * r : 8 * r + 8, 8 * c : 8 * c + 8],
            )
            for scale in (1.0, 0.55, 0.2):
                if np.array_equal(block, (seen * scale).astype(np.uint8)):
                    level[p] = scale
                    break
        return level

    stage1_tokens = [f"patch:{p}" for p in s1["dominant"]] + [f"context:{a}" for a in members]
    assert (expected(stage1_tokens) == 1.0).sum() == len(s1["dominant"]) + len(members)
    np.testing.assert_array_equal(lit(stage1), expected(stage1_tokens))
    for panel, drop in zip(drops, info["stage2"], strict=True):
        np.testing.assert_array_equal(lit(panel), expected(drop["kept_tokens"]))
    assert (lit(drops[-1]) == 0.2).all()  # the last drop keeps no visual token


def test_explicit_knobs_and_saved_config(tiny_dir, image_file, tmp_path):
    cfg = tmp_path / "duet.json"
    result = run(
        "compress",
        tiny_dir,
        "--dominant",
        9,
        "--contextual",
        3,
        "--drop-layers",
        "2,5",
        "--keep-ratios",
        "0.5,0.25",
        "--query",
        "all",
        "--save-config",
        cfg,
        "--image",
        image_file,
        "--prompt",
        "What is it?",
        "--max-new-tokens",
        4,
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(cfg.read_text())
    assert saved["config"]["dominant"] == 9 and saved["report"]["visual_tokens"] == 12
    again = run("inspect", tiny_dir, "--image", image_file, "--prompt", "What?", "--config", cfg, "--json")
    assert json.loads(again.stdout)["visual_tokens"] == 12


@pytest.fixture()
def not_llava(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    return d


BAD = [
    (["--budget", 65], "larger than the 64 visual tokens"),
    (["--budget", 10, "--dominant", 3], "not several"),
    (["--drop-layers", "2,9", "--keep-ratios", "0.5,0.1"], "out of range"),
    (["--drop-layers", "5,2", "--keep-ratios", "0.5,0.1"], "strictly increasing"),
    (["--drop-layers", "2,5", "--keep-ratios", "0.2,0.5"], "non-increasing"),
    (["--drop-layers", "2,x", "--keep-ratios", "0.2,0.5"], "comma-separated list of int"),
    (["--budget", 10, "--raw"], "placeholder"),
    ([], "give --budget"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_input_is_one_line_and_exit_2(tiny_dir, image_file, extra, message):
    result = run("inspect", tiny_dir, "--image", image_file, "--prompt", "What?", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_bad_files_are_one_line_and_exit_2(tiny_dir, image_file, not_llava, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cases = [
        ([tiny_dir, "--image", text], "is not an image"),
        ([tiny_dir, "--image", tmp_path / "missing.png"], "no such image file"),
        ([not_llava, "--image", image_file], "holds a BertModel checkpoint"),
        ([tmp_path, "--image", image_file], "no config.json"),
        ([tmp_path / "nope", "--image", image_file], "no such model directory"),
    ]
    for args, message in cases:
        result = run("inspect", *args, "--prompt", "What?", "--budget", 10)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_corrupt_weights(tiny_dir, image_file, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    result = run("inspect", broken, "--image", image_file, "--prompt", "What?", "--budget", 10)
    assert result.exit_code == 2 and "could not load the model" in result.stderr


def test_demo_runs_end_to_end(tmp_path):
    result = run("demo", "--workdir", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "V2V dominant=" in result.stdout and "DUET answer:" in result.stdout
    assert (tmp_path / "demo" / "tiny-llava" / "model.safetensors").is_file()
    assert "DUET answer on onnxruntime (the same tokens as PyTorch)" in result.stdout
    assert (tmp_path / "demo" / "bundle" / "manifest.json").is_file()
    assert "K/V cache after the prompt" in result.stdout and " ms " not in result.stdout


def test_demo_reports_savings_that_follow_the_kept_tokens(tmp_path):
    """The K/V bytes the demo prints are what the model's own cache holds after the prompt, compressed or not."""
    import torch

    from duet_export import compress, load, prepare_inputs
    from duet_export.demo import DEMO_PROMPT, demo_image, run_demo

    out = run_demo(tmp_path / "demo", echo=lambda m: None)
    assert out["flops"][1] < out["flops"][0]
    loaded = load(tmp_path / "demo" / "tiny-llava")
    cached = []
    for config in (None, out["config"]):
        if config is not None:
            compress(loaded.model, config)
        inputs = prepare_inputs(loaded.processor, loaded.adapter, [demo_image()], [DEMO_PROMPT], config)
        with torch.no_grad():
            cache = loaded.model(**inputs, use_cache=True).past_key_values
        cached.append(sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers))
    assert tuple(out["kv_bytes"]) == tuple(cached)
