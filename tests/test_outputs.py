"""Where commands write (duet_export.outputs): permissions, replacing our own results, stale temporaries of
a killed run, a second writer, and the verified-digest cache of the runtime."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from duet_export.cli import cli
from duet_export.errors import DuetError
from duet_export.export import digests
from duet_export.export.manifest import read_manifest
from duet_export.outputs import BUNDLE, DATASET, atomic_file, check_output_folder, replace_folder

from conftest import bundle_config


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_outputs_get_the_umask_permissions_new_and_replaced(tmp_path, umask_027):
    out = tmp_path / "data"
    assert run("data", "griddigits", out, "--train-images", 2, "--test-images", 2).exit_code == 0
    assert mode(out) == 0o750 and mode(out / "spec.json") == 0o640
    result = run("data", "griddigits", out, "--train-images", 3, "--test-images", 2)
    assert result.exit_code == 2 and "--force" in result.stderr  # an earlier dataset of ours
    result = run("data", "griddigits", out, "--train-images", 3, "--test-images", 2, "--force")
    assert result.exit_code == 0, result.output
    assert (
        mode(out) == 0o750 and json.loads((out / "spec.json").read_text())["splits"]["train"]["samples"] == 3
    )
    answers = tmp_path / "answers.jsonl"
    with atomic_file(answers) as tmp:
        tmp.write_text("x")
    assert mode(answers) == 0o640
    answers.chmod(0o600)  # a file the user made private stays private when replaced
    with atomic_file(answers) as tmp:
        tmp.write_text("y")
    assert mode(answers) == 0o600 and answers.read_text() == "y"


def test_states_of_an_output_folder(tmp_path):
    assert check_output_folder(tmp_path / "new", BUNDLE)[1] == "new"
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", BUNDLE)[1] == "empty"
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "spec.json").write_text(json.dumps({"format": DATASET.format, "files": ["a.png"]}))
    (ours / "a.png").write_bytes(b"")
    with pytest.raises(DuetError, match="--force"):
        check_output_folder(ours, DATASET)
    assert check_output_folder(ours, DATASET, force=True)[1] == "ours"
    with pytest.raises(DuetError, match="not a bundle"):
        check_output_folder(ours, BUNDLE, force=True)  # a dataset is not a bundle
    (ours / "b.png").write_bytes(b"")
    with pytest.raises(DuetError, match=r"does not list \(b.png\)"):
        check_output_folder(ours, DATASET, force=True)


def test_stale_temporaries_are_removed_and_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "bundle"
    target.parent.mkdir()
    (target.parent / ".bundle.tmp-killed").mkdir()
    (target.parent / ".bundle.tmp-killed" / "prefill.onnx").write_bytes(b"partial")
    (target.parent / ".bundle.old-killed").mkdir()
    (target.parent / ".bundle.lock").write_text("")  # a lock file nobody holds
    (target.parent / ".other.tmp-x").mkdir()  # not ours to remove: another output's
    with replace_folder(target, BUNDLE) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in target.parent.iterdir()) == [".other.tmp-x", "bundle"]
    with pytest.raises(RuntimeError), replace_folder(tmp_path / "deep" / "er" / "b2", BUNDLE) as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError("simulated failure")
    assert not (tmp_path / "deep").exists()  # folders created for it go too


def test_a_second_writer_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "b"
    fd = os.open(tmp_path / ".b.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running export holds it
    try:
        result = run("export", tiny_dir, out, "--budget", 20)
        assert result.exit_code == 2 and "another duet-export process is writing" in result.stderr
    finally:
        os.close(fd)
    assert not out.exists()


def test_export_killed_midway_then_exported_again(tiny_dir, tmp_path):
    """kill -9 during an export: nothing at OUT, and the next export cleans what the killed one left."""
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "duet_export.cli", "export", str(tiny_dir), str(out), "--budget", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any((p / "vision.onnx").exists() for p in tmp_path.glob(".b.tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the export ended before it was killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".b.tmp-*"))
    result = run("export", tiny_dir, out, "--budget", 20)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    read_manifest(out, verify="full")


def test_the_digest_cache_skips_verified_files_and_catches_a_changed_byte(bundles, tmp_path, monkeypatch):
    import shutil

    bundle = shutil.copytree(bundles / "full", tmp_path / "bundle")
    hashed = []
    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda p: hashed.append(Path(p).name) or real(p))
    manifest = read_manifest(bundle, verify="cached")
    assert sorted(hashed) == sorted(f["name"] for f in manifest["files"])
    hashed.clear()
    read_manifest(bundle, verify="cached")
    assert hashed == []  # remembered: same path, size, mtime and inode
    path = bundle / "step.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))  # same size, new mtime
    with pytest.raises(DuetError, match=r"step\.onnx does not match its checksum"):
        read_manifest(bundle, verify="cached")
    hashed.clear()
    with pytest.raises(DuetError, match="checksum"):
        read_manifest(bundle, verify="full")  # check: never trusts the cache


def test_train_refuses_a_resume_with_other_options_and_starts_over_with_force(tiny, tmp_path):
    from duet_export.data.griddigits import GridSpec, build_griddigits
    from duet_export.data.records import read_llava_json
    from duet_export.training import TrainSettings, train

    grid = tmp_path / "grid"
    build_griddigits(grid, GridSpec(train_images=2, test_images=1), echo=lambda m: None)
    examples = read_llava_json(grid / "train.json")[:2]
    quiet = lambda m: None  # noqa: E731
    settings = TrainSettings(
        steps=2, batch_size=1, save_steps=1, warmup_steps=0, progress=False, stop_after=1
    )
    train(tiny, examples, tmp_path / "run", bundle_config(tiny), settings, echo=quiet)
    resume = TrainSettings(steps=2, batch_size=2, save_steps=1, warmup_steps=0, progress=False, resume=True)
    with pytest.raises(DuetError, match=r"started with other options .*batch_size 1 vs 2"):
        train(tiny, examples, tmp_path / "run", bundle_config(tiny), resume, echo=quiet)
    same = TrainSettings(**{**resume.__dict__, "batch_size": 1})
    # the run's config names no positions (as runs recorded before the choice existed): the reference, compact
    with pytest.raises(DuetError, match=r"started with other options .*'positions': 'keep'"):
        train(
            tiny, examples, tmp_path / "run", replace(bundle_config(tiny), positions="keep"), same, echo=quiet
        )
    train(
        tiny, examples, tmp_path / "run", replace(bundle_config(tiny), positions="compact"), same, echo=quiet
    )
    with pytest.raises(DuetError, match=r"started with other options .*compression"):
        train(tiny, examples, tmp_path / "run", None, same)
    (tmp_path / "run" / "mine.txt").write_text("mine")
    force = TrainSettings(steps=1, batch_size=1, warmup_steps=0, progress=False, force=True)
    with pytest.raises(DuetError, match=r"mine\.txt"):
        train(tiny, examples, tmp_path / "run", None, force, echo=quiet)
    (tmp_path / "run" / "mine.txt").unlink()
    result = train(tiny, examples, tmp_path / "run", None, force, echo=quiet)
    assert result.losses  # a run shorter than the logging interval still reports its final loss
    record = json.loads((tmp_path / "run" / "duet_train.json").read_text())
    assert record["config"] is None and "model.safetensors" in record["files"]
    assert json.loads((tmp_path / "run" / "duet_config.json").read_text()) is None
