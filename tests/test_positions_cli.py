"""`--positions` on every command that compresses: compress, inspect, train (the training forward keeps the
places too), eval, and the saved config and checkpoint record the choice."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from test_positions import record_positions, uncompressed_places

from duet_export import compress
from duet_export.cli import cli
from duet_export.config import DuetConfig
from duet_export.data.griddigits import GridSpec, build_griddigits
from duet_export.data.records import read_llava_json
from duet_export.forward import DuetTrace
from duet_export.loading import load, load_visual
from duet_export.training import VQACollator

from conftest import random_image

SPEC = GridSpec(rows=2, cols=2, cell=32, digit=24, train_images=4, test_images=2, seed=3)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_compress_and_inspect_take_positions(tiny_dir, tmp_path):
    saved = tmp_path / "duet.json"
    result = run("compress", tiny_dir, "--budget", 21, "--positions", "keep", "--save-config", saved)
    assert result.exit_code == 0, result.output
    assert "positions=keep" in result.output
    assert json.loads(saved.read_text())["config"]["positions"] == "keep"
    random_image(3).save(tmp_path / "img.png")
    common = ["inspect", tiny_dir, "--image", tmp_path / "img.png", "--prompt", "What digit?", "--json"]
    kept = json.loads(run(*common, "--config", saved).stdout)
    assert kept["positions"] == "keep"
    assert json.loads(run(*common, "--budget", 21).stdout)["positions"] == "keep"  # new configs' default
    assert json.loads(run(*common, "--budget", 21, "--positions", "compact").stdout)["positions"] == "compact"
    older = tmp_path / "older.json"  # a config file written before the choice existed: the reference's
    older.write_text(
        json.dumps({k: v for k, v in json.loads(saved.read_text())["config"].items() if k != "positions"})
    )
    assert json.loads(run(*common, "--config", older).stdout)["positions"] == "compact"


def test_training_forward_keeps_the_places(tiny, tmp_path):
    """A training batch (answers labelled) goes through the same kept positions as a prompt does."""
    data = tmp_path / "grid"
    build_griddigits(data, SPEC, echo=lambda m: None)
    example = read_llava_json(data / "train.json")[0]
    config = DuetConfig(
        dominant=20, contextual=6, drop_layers=(4, 6), keep_ratios=(0.5, 0.25), positions="keep"
    )
    compress(tiny.model, config)
    batch = VQACollator(tiny, config)([example])
    seen = record_positions(tiny.model)
    trace = DuetTrace()
    loss = tiny.model(**batch, duet_trace=trace).loss
    assert torch.isfinite(loss)
    visual = batch["input_ids"][0] == tiny.adapter.image_token_id
    image = load_visual(example.image, tiny.adapter)
    text, patches, _ = uncompressed_places(tiny, [image], [example.question])[0]
    s1 = trace.stage1
    expected = [patches[0]] + [patches[int(p)] for p in [*s1.dominant[0], *s1.anchors[0]]]
    assert seen[0][0][visual].tolist() == expected
    others = seen[0][0][~visual].tolist()  # the question's tokens, then the answer's after them
    assert others[: len(text)] == text
    assert others[len(text) :] == list(range(text[-1] + 1, text[-1] + 1 + len(others) - len(text)))


def test_train_and_eval_cli_with_keep(tiny_dir, tmp_path):
    data = tmp_path / "grid"
    build_griddigits(data, SPEC, echo=lambda m: None)
    out = tmp_path / "ckpt"
    result = run(
        "train",
        tiny_dir,
        data,
        "-o",
        out,
        "--budget",
        21,
        "--positions",
        "keep",
        "--steps",
        2,
        "--batch-size",
        2,
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "duet_config.json").read_text())["positions"] == "keep"
    assert load(out).adapter.family == "llava"
    result = run("eval", out, data / "test.jsonl", "--budget", 21, "--positions", "keep", "--json")
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.stdout)["accuracy"] <= 1
