"""A training run's folder: what `train --output OUT` may write to, and what `--resume` checks.

OUT follows `duet_export.outputs`' rule for work folders: absent, empty, or a training run of ours (its
`duet_train.json`). An earlier run is continued only with `--resume`, and only with the options that shape
it (compression config, batch size, accumulation, trained parts, learning rate, warmup, weight decay,
position squeeze: a resume with others would leave a model that `duet_config.json` misdescribes), or is
started over with `--force` (its checkpoints and final files are removed first). A folder holding any other
file is never touched. The final model, processor and `duet_config.json` land in OUT, one complete file at
a time, and `duet_train.json` lists them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from duet_export.config import DuetConfig
from duet_export.errors import DuetError, one_line
from duet_export.outputs import TRAINING, check_output_folder, listed_files, work_folder, write_record

__all__ = ["check_training_output", "restore_weights", "save_final", "training_folder"]

_SHAPING = (
    "batch_size",
    "grad_accum",
    "train",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "position_squeeze",
)


def _run_record(config: DuetConfig | None, settings: Any) -> dict[str, Any]:
    chosen = {k: v for k, v in asdict(settings).items() if k in _SHAPING}
    # through JSON, so that it compares equal to a record read back (tuples become lists)
    return json.loads(json.dumps({"config": config.to_dict() if config else None, "settings": chosen}))


def check_training_output(
    output: str | os.PathLike, *, resume: bool, force: bool, inputs: Iterable[str | os.PathLike | None] = ()
) -> tuple[Path, str]:
    """The rule for OUT before any work; returns (path, state) as `check_output_folder`."""
    if resume and force:
        raise DuetError("--resume and --force exclude each other")
    out, state = check_output_folder(output, TRAINING, inputs=inputs)
    if state == "ours" and not (resume or force):
        raise DuetError(
            f"{output} holds an earlier training run: pass --resume to continue it or --force to start over"
        )
    if state != "ours" and resume:
        raise DuetError(f"--resume: {output} holds no training run to continue")
    return out, state


def _differences(earlier: dict, now: dict, reference_positions: str | None) -> list[str]:
    out = []
    if _with_positions(earlier.get("config"), reference_positions) != _with_positions(
        now["config"], reference_positions
    ):
        out.append(f"compression {earlier.get('config')} vs {now['config']}")
    before = earlier.get("settings") or {}
    out += [f"{k} {before.get(k)} vs {v}" for k, v in now["settings"].items() if before.get(k) != v]
    return out


def _with_positions(config: dict | None, reference: str | None) -> dict | None:
    """A recorded config with `positions` filled in: one that names none (every run recorded before the
    choice existed) means the family's reference, so `--positions compact` resumes such a LLaVA run."""
    if config is None or reference is None:
        return config
    return {**config, "positions": config.get("positions") or reference}


@contextlib.contextmanager
def training_folder(
    output: str | os.PathLike,
    config: DuetConfig | None,
    settings: Any,
    inputs: Iterable[str | os.PathLike | None] = (),
    reference_positions: str | None = None,
) -> Iterator[Path]:
    """OUT, checked, locked and recorded for this run (see the module docstring). `reference_positions`:
    what a recorded config without `positions` means for this family (the adapter's `position_mode(None)`)."""
    inputs = list(inputs)
    check_training_output(output, resume=settings.resume, force=settings.force, inputs=inputs)
    with work_folder(output, TRAINING, inputs=inputs) as (out, state):
        if state != "ours" and settings.resume:  # the run went away since the first check
            raise DuetError(f"--resume: {output} holds no training run to continue")
        record = _run_record(config, settings)
        earlier = TRAINING.read_record(out) or {}
        if state == "ours" and settings.resume:
            changed = _differences(earlier, record, reference_positions)
            if changed:
                raise DuetError(
                    f"--resume: the run in {output} was started with other options ({'; '.join(changed)}): "
                    "resume with the same ones, or pass --force to start over"
                )
        else:
            if state == "ours":  # --force: start over
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                for name in listed_files(earlier):
                    (out / name).unlink(missing_ok=True)
            write_record(out, TRAINING, record)
        yield out


def restore_weights(model, checkpoints: Path) -> str:
    """Load the last checkpoint's weights through `from_pretrained` and return its path.

    transformers 5 saves LLaVA weights under their original (legacy) names and renames them on
    `from_pretrained`; the Trainer's own resume loads the file non-strictly without that renaming and would
    silently keep the current weights. Optimizer, scheduler, RNG and data position still come from the
    Trainer. A checkpoint that cannot be read is a one-line error.
    """
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is None:
        raise DuetError(f"--resume: no checkpoint under {checkpoints}")
    try:
        saved = type(model).from_pretrained(
            last, dtype=next(model.parameters()).dtype, trust_remote_code=False
        )
    except Exception as e:
        raise DuetError(f"--resume: cannot read {last}: {one_line(e)}") from None
    missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    if missing or unexpected:
        raise DuetError(f"--resume: {last} does not match the model ({len(missing)} missing weights)")
    return last


def save_final(loaded, out: Path, config: DuetConfig | None) -> None:
    """Write model + processor into a temporary folder, move each complete file into `out`, and list them
    in the run's record."""
    (out / "checkpoints").mkdir(exist_ok=True)  # a temporary there is ours even if we are killed
    tmp = Path(tempfile.mkdtemp(dir=out / "checkpoints", prefix=".final-"))
    try:
        loaded.model.save_pretrained(tmp)
        loaded.processor.save_pretrained(tmp)
        (tmp / "duet_config.json").write_text(config.to_json() if config is not None else "null")
        names = sorted(f.name for f in tmp.iterdir())
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = TRAINING.read_record(out) or {}
    record["files"] = sorted({*listed_files(record), *names})
    record.pop("format", None)
    write_record(out, TRAINING, record)
