"""The standing check on bad input: every case exits with code 2 and one line on stderr (no traceback),
and leaves every input, the output and the output's folder exactly as they were.

Each case builds what it needs in a fresh folder, the folder and all shared inputs are snapshotted (every
file's bytes, every entry's mode, hidden ones included), the CLI runs, and the snapshot is taken again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from duet_export.cli import cli
from duet_export.tiny import TinyQwenSpec, build_tiny_qwen2_5_vl

from conftest import random_image


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under `roots` (hidden ones too): kind, mode, and a file's size and SHA-256."""
    out = {}
    for root in roots:
        out[str(root)] = ("dir", root.stat().st_mode) if root.exists() else ("absent",)
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            st = path.lstat()
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path)] = ("dir", st.st_mode)
            else:
                out[str(path)] = (
                    "file",
                    st.st_mode,
                    st.st_size,
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
    return out


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height (over Pillow's bomb limit) with next to no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@dataclass
class World:
    """Shared inputs (never to be changed by any case) and a fresh folder per case."""

    model: Path
    bundle: Path  # a compressed CPU bundle
    qwen: Path  # a tiny Qwen2.5-VL (M-RoPE positions, always kept)
    image: Path
    shared: Path
    tmp: Path

    def bundle_copy(self, edit: Callable[[Path, dict], None] | None = None, relist: bool = False) -> Path:
        """A copy of the bundle; `edit(folder, manifest)` may change both; `relist` re-records the files
        (so that only the edit, not a checksum, is what the case trips over)."""
        folder = shutil.copytree(self.bundle, self.tmp / "bundle")
        manifest = json.loads((folder / "manifest.json").read_text())
        if edit is not None:
            edit(folder, manifest)
        if relist:
            manifest["files"] = [
                {
                    "name": f.name,
                    "bytes": f.stat().st_size,
                    "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                }
                for f in sorted(folder.iterdir())
                if f.name != "manifest.json"
            ]
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    def model_copy(self, edit: Callable[[Path], None]) -> Path:
        folder = shutil.copytree(self.model, self.tmp / "model")
        edit(folder)
        return folder

    def user_folder(self) -> Path:
        """A folder of the user's, with a file of theirs in it."""
        folder = self.tmp / "mine"
        folder.mkdir()
        (folder / "notes.txt").write_text("my notes")
        return folder

    def questions(self, lines: list[dict | str]) -> Path:
        """A questions file beside a copy of the image and a text file named bad.png."""
        shutil.copy(self.image, self.tmp / "img.png")
        (self.tmp / "bad.png").write_text("not an image")
        path = self.tmp / "questions.jsonl"
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
        return path

    def data(self) -> Path:
        path = self.tmp / "train.json"
        record = {"id": "a", "image": self.image.name, "conversations": [
            {"from": "human", "value": "<image>\nWhat digit?"}, {"from": "gpt", "value": "7"}]}  # fmt: skip
        shutil.copy(self.image, self.tmp / self.image.name)
        path.write_text(json.dumps([record]))
        return path


@pytest.fixture(scope="module")
def shared(tiny_dir, bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    random_image(5, size=64).save(root / "img.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(root / "img16.png")
    png_header_only(root / "bomb.png", 30000, 30000)
    shutil.copytree(bundles / "cpu", root / "bundle")
    build_tiny_qwen2_5_vl(root / "qwen", TinyQwenSpec())
    return root


@pytest.fixture()
def world(tiny_dir, shared, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return World(tiny_dir, shared / "bundle", shared / "qwen", shared / "img.png", shared, work)


def _earlier_bundle(w: World, extra: bool = False) -> Path:
    out = w.bundle_copy()
    if extra:
        (out / "notes.txt").write_text("mine")
    return out


def _earlier_run(w: World) -> Path:
    out = w.tmp / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "duet_train.json").write_text(json.dumps({"format": "duet-export-training", "settings": {}}))
    return out


def _auto_map_model(folder: Path) -> None:
    (folder / "evil.py").write_text("open(__file__ + '.ran', 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))


def _auto_map_bundle(folder: Path, manifest: dict) -> None:
    (folder / "evil.py").write_text("open(__file__ + '.ran', 'w').write('ran')\n")
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))


def _outside(folder: Path, manifest: dict) -> None:
    shutil.copy(folder / "vision.onnx", folder.parent / "vision.onnx")
    (folder / "vision.onnx").unlink()
    manifest["graphs"]["vision"]["files"] = ["../vision.onnx"]
    entry = next(f for f in manifest["files"] if f["name"] == "vision.onnx")
    entry["name"] = "../vision.onnx"


def _absolute(folder: Path, manifest: dict) -> None:
    manifest["files"].append({"name": str(folder.parent / "x.bin"), "bytes": 1, "sha256": "0" * 64})
    (folder.parent / "x.bin").write_bytes(b"x")


def _linked_outside(folder: Path, manifest: dict) -> None:
    shutil.move(folder / "tokenizer.json", folder.parent / "tokenizer.json")
    (folder / "tokenizer.json").symlink_to(folder.parent / "tokenizer.json")


def _linked_inside(folder: Path, manifest: dict) -> None:
    shutil.move(folder / "tokenizer.json", folder / "tok.json")
    (folder / "tokenizer.json").symlink_to("tok.json")


def _flip_byte(folder: Path, manifest: dict) -> None:
    path = folder / "step.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))


def _claim_float16(folder: Path, manifest: dict) -> None:
    manifest["dtype"] = "float16"  # the graphs are float32


def _position_mode(value: str) -> Callable[[Path, dict], None]:
    return lambda folder, manifest: manifest.update(position_mode=value)


def _drop(key: str) -> Callable[[Path, dict], None]:
    return lambda folder, manifest: manifest.pop(key)


def _no_bytes(folder: Path, manifest: dict) -> None:
    manifest["files"][0].pop("bytes")


def _config(w: World, value) -> Path:
    path = w.tmp / "duet.json"
    path.write_text(json.dumps(value))
    return path


def _corrupt_checkpoint(w: World) -> Path:
    out = _earlier_run(w)
    ckpt = out / "checkpoints" / "checkpoint-1"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(w.model / name, ckpt / name)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    record = json.loads((out / "duet_train.json").read_text())
    record.update(config=None, settings={"batch_size": 1, "grad_accum": 1, "train": ["projector", "llm"],
                  "learning_rate": 2e-4, "warmup_steps": 50, "weight_decay": 0.0, "position_squeeze": 0.0})  # fmt: skip
    (out / "duet_train.json").write_text(json.dumps(record))
    return out


TRAIN = ["--steps", 1, "--batch-size", 1]
Q = {"question_id": "1", "image": "img.png", "text": "What digit?"}

# fmt: off
# (id, build(world) -> CLI arguments, a fragment of the expected message)
CASES: list[tuple[str, Callable[[World], list], str]] = [
    # --- outputs: never a user's files, never an input
    ("export-into-user-folder", lambda w: ["export", w.model, w.user_folder(), "--budget", 20], "not empty"),
    ("export-into-the-model", lambda w: ["export", w.model, w.model, "--budget", 20], "also an input"),
    ("export-inside-the-model", lambda w: ["export", w.model, w.model / "b", "--budget", 20], "inside the input"),
    ("export-around-the-model", lambda w: ["export", w.model, w.model.parent, "--budget", 20], "holds the input"),
    ("export-over-a-bundle", lambda w: ["export", w.model, _earlier_bundle(w), "--budget", 20], "--force"),
    ("export-force-over-user-file", lambda w: ["export", w.model, _earlier_bundle(w, extra=True), "--budget", 20,
     "--force"], "notes.txt"),
    ("export-into-cwd", lambda w: ["export", w.model, ".", "--budget", 20], "current directory"),
    ("export-unwritable", lambda w: ["export", w.model, "/proc/duet-out", "--budget", 20], "cannot write"),
    ("export-onto-a-file", lambda w: ["export", w.model, w.user_folder() / "notes.txt", "--budget", 20], "is a file"),
    ("data-into-user-folder", lambda w: ["data", "griddigits", w.user_folder(), "--train-images", 2], "not empty"),
    ("train-into-user-folder", lambda w: ["train", w.model, w.data(), "-o", w.user_folder(), *TRAIN], "not empty"),
    ("train-over-a-run", lambda w: ["train", w.model, w.data(), "-o", _earlier_run(w), *TRAIN], "--resume"),
    ("train-resume-nothing", lambda w: ["train", w.model, w.data(), "-o", w.tmp / "new", "--resume", *TRAIN],
     "no training run"),
    ("train-resume-corrupt", lambda w: ["train", w.model, w.data(), "-o", _corrupt_checkpoint(w), "--resume",
     "--no-compress", *TRAIN], "cannot read"),
    ("bench-into-user-folder", lambda w: ["bench", w.model, "--out", w.user_folder()], "not empty"),
    ("bench-bad-budget", lambda w: ["bench", w.model, "--out", w.tmp / "b", "--budget", 1e6, "--no-memory"],
     "budget"),
    ("bench-layers-of-a-checkpoint", lambda w: ["bench", w.model, "--out", w.tmp / "b", "--layers", 4], "--shape"),
    ("run-bad-thread-pool", lambda w: ["run", w.bundle, "--image", w.image, "--prompt", "hi", "--thread-pool",
     "spin"], "thread-pool"),
    ("demo-into-user-folder", lambda w: ["demo", "--workdir", w.user_folder()], "not empty"),
    ("answers-over-questions", lambda w: ["eval", w.bundle, (q := w.questions([Q])), "--answers", q], "also an input"),
    ("save-config-into-model", lambda w: ["compress", w.model, "--budget", 20, "--save-config",
     w.model / "config.json"], "inside the input"),
    ("overlay-over-image", lambda w: ["inspect", w.model, "--image", w.image, "--prompt", "hi", "--budget", 20,
     "--overlay", w.image], "also an input"),
    ("serve-allow-files-missing", lambda w: ["serve", w.bundle, "--port", 0, "--allow-files", w.tmp / "none"],
     "no such folder"),
    ("serve-negative-max-wait", lambda w: ["serve", w.bundle, "--port", 0, "--max-wait-ms", -1], "--max-wait-ms"),
    ("serve-bundle-no-target", lambda w: ["serve", w.bundle_copy(_drop("target")), "--port", 0], "'target'"),
    # --- code that came with a model or bundle is never run
    ("model-auto-map", lambda w: ["compress", w.model_copy(_auto_map_model), "--budget", 20], "own code"),
    ("bundle-auto-map", lambda w: ["run", w.bundle_copy(_auto_map_bundle, relist=True), "--image", w.image,
     "--prompt", "hi"], "own code"),
    # --- bundles: confined and verified
    ("bundle-path-outside-run", lambda w: ["run", w.bundle_copy(_outside), "--image", w.image, "--prompt", "hi"],
     "outside the bundle"),
    ("bundle-path-outside-check", lambda w: ["check", w.bundle_copy(_outside)], "outside the bundle"),
    ("bundle-path-absolute", lambda w: ["check", w.bundle_copy(_absolute)], "outside the bundle"),
    ("bundle-link-outside", lambda w: ["check", w.bundle_copy(_linked_outside)], "outside the bundle"),
    ("bundle-link-inside", lambda w: ["check", w.bundle_copy(_linked_inside)], "not a plain file"),
    ("bundle-no-tokenizer-check", lambda w: ["check", w.bundle_copy(lambda f, m: (f / "tokenizer.json").unlink())],
     "tokenizer.json is missing"),
    ("bundle-flipped-byte-run", lambda w: ["run", w.bundle_copy(_flip_byte), "--image", w.image, "--prompt", "hi"],
     "checksum"),
    ("bundle-no-target", lambda w: ["run", w.bundle_copy(_drop("target")), "--image", w.image, "--prompt", "hi"],
     "'target'"),
    ("bundle-no-bytes", lambda w: ["check", w.bundle_copy(_no_bytes)], "bytes"),
    # --- one-line errors for bad values
    ("config-not-object", lambda w: ["compress", w.model, "--config", _config(w, [1, 2])], "JSON object"),
    ("config-wrong-type", lambda w: ["compress", w.model, "--config", _config(w, {"dominant": "ten"})],
     "'dominant' must be an integer"),
    ("config-empty", lambda w: ["compress", w.model, "--config", _config(w, {})], "--no-compress"),
    ("image-bomb", lambda w: ["compress", w.model, "--budget", 20, "--image", w.shared / "bomb.png", "--prompt",
     "hi"], "decompression bomb"),
    ("image-16-bit-pytorch", lambda w: ["compress", w.model, "--budget", 20, "--image", w.shared / "img16.png",
     "--prompt", "hi"], "more than 8 bits"),
    ("top-k-over-vocab", lambda w: ["run", w.bundle, "--image", w.image, "--prompt", "hi", "--sample", "--top-k",
     10**6], "vocabulary"),
    ("compress-no-new-tokens", lambda w: ["compress", w.model, "--budget", 20, "--image", w.image, "--prompt",
     "hi", "--max-new-tokens", 0], "at least 1"),
    ("run-no-new-tokens", lambda w: ["run", w.bundle, "--image", w.image, "--prompt", "hi", "--max-new-tokens",
     0], "at least 1"),
    ("run-negative-new-tokens", lambda w: ["run", w.bundle, "--image", w.image, "--prompt", "hi",
     "--max-new-tokens", -3], "at least 1"),
    ("run-too-many-new-tokens", lambda w: ["run", w.bundle, "--image", w.image, "--prompt", "hi",
     "--max-new-tokens", 1000], "at most"),
    ("run-negative-temperature", lambda w: ["run", w.bundle, "--image", w.image, "--prompt", "hi", "--sample",
     "--temperature", -1], "positive"),
    ("run-negative-temperature-greedy", lambda w: ["run", w.bundle, "--image", w.image, "--prompt", "hi",
     "--temperature", -1], "positive"),
    ("run-top-p-zero", lambda w: ["run", w.bundle, "--image", w.image, "--prompt", "hi", "--sample", "--top-p",
     0], "top-p"),
    ("eval-batch-zero", lambda w: ["eval", w.bundle, w.questions([Q]), "--batch-size", 0], "at least 1"),
    ("eval-wrong-field-type", lambda w: ["eval", w.bundle, w.questions([Q, {**Q, "text": 7}])],
     "line 2: 'text' must be a string"),
    ("eval-unreadable-image", lambda w: ["eval", w.bundle, w.questions([Q, {**Q, "image": "bad.png"}])],
     "line 2"),
    # --- precision
    ("int4-on-migraphx", lambda w: ["export", w.model, w.tmp / "b", "--budget", 20, "--target", "migraphx",
     "--weights", "int4"], "MIGraphX"),
    ("int8-on-migraphx-float16", lambda w: ["export", w.model, w.tmp / "b", "--budget", 20, "--target",
     "migraphx", "--weights", "int8"], "--dtype float32"),
    ("quantize-vision-alone", lambda w: ["export", w.model, w.tmp / "b", "--budget", 20, "--quantize-vision"],
     "--weights int8 or int4"),
    ("block-size-not-power-of-two", lambda w: ["export", w.model, w.tmp / "b", "--budget", 20, "--weights",
     "int4", "--block-size", 100], "power of two"),
    ("unknown-dtype", lambda w: ["export", w.model, w.tmp / "b", "--budget", 20, "--dtype", "float8"],
     "float8"),
    ("manifest-dtype-disagrees", lambda w: ["run", w.bundle_copy(_claim_float16, relist=True), "--image",
     w.image, "--prompt", "hi"], "disagree"),
    # --- positions: compact | keep, where the family and the bundle allow it
    ("positions-compact-on-qwen", lambda w: ["compress", w.qwen, "--budget", 20, "--positions", "compact"],
     "always keeps its M-RoPE"),
    ("positions-compact-on-qwen-export", lambda w: ["export", w.qwen, w.tmp / "b", "--budget", 20, "--positions",
     "compact"], "always keeps its M-RoPE"),
    ("positions-compact-on-qwen-config", lambda w: ["inspect", w.qwen, "--image", w.image, "--prompt", "hi",
     "--config", _config(w, {"dominant": 20, "positions": "compact"})], "always keeps its M-RoPE"),
    ("positions-unknown", lambda w: ["compress", w.model, "--budget", 20, "--positions", "sideways"], "sideways"),
    ("positions-unknown-in-config", lambda w: ["compress", w.model, "--config", _config(w, {"dominant": 10,
     "positions": "sideways"})], "'positions' must be"),
    ("positions-disagree-with-config", lambda w: ["compress", w.model, "--config", _config(w, {"dominant": 10,
     "positions": "keep"}), "--positions", "compact"], "disagrees"),
    ("positions-on-a-bundle", lambda w: ["eval", w.bundle, w.questions([Q]), "--positions", "keep"],
     "fixed at export"),
    ("bundle-unknown-position-mode", lambda w: ["run", w.bundle_copy(_position_mode("sideways"), relist=True),
     "--image", w.image, "--prompt", "hi"], "'position_mode' must be"),
    ("model-no-tokenizer", lambda w: ["compress", w.model_copy(lambda f: (f / "tokenizer.json").unlink()),
     "--budget", 20], "no tokenizer files"),
]
# fmt: on


@pytest.mark.parametrize("build,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, build, fragment):
    args = [str(a) for a in build(world)]
    before = snapshot(world.tmp, world.shared, world.model)
    result = CliRunner().invoke(cli, args)
    assert "Traceback" not in result.output
    assert result.exit_code == 2, (args, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert snapshot(world.tmp, world.shared, world.model) == before


def test_a_prompt_past_the_models_positions_gets_a_note(tiny, monkeypatch):
    from duet_export.generate import GenerationSettings, generate_answers

    notes = []
    settings = GenerationSettings(max_new_tokens=2)
    generate_answers(tiny, [random_image(1)], ["hi"], settings, on_note=notes.append)
    assert notes == []
    monkeypatch.setattr(tiny.adapter.text_config, "max_position_embeddings", 20)
    generate_answers(tiny, [random_image(1)], ["hi"], settings, on_note=notes.append)
    assert len(notes) == 1 and "max_position_embeddings (20)" in notes[0]
