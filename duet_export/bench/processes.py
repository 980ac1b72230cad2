"""The benchmark's measurements that run in processes of their own: timing workers and peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from duet_export.config import DuetConfig
from duet_export.errors import DuetError


def timed_in_subprocess(spec: dict, echo: Callable[[str], None]) -> dict:
    """Run one backend's worker process; relay its progress; return its result."""
    label = spec["label"]
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, log = Path(tmp) / "spec.json", Path(tmp) / "stderr.log"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **spec.get("env", {})}
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "duet_export.bench.worker", str(spec_file)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
            result = None
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue
                message = json.loads(line)
                if "progress" in message:
                    done, total = message["progress"]
                    echo(f"  {label}: round {done}/{total}")
                elif "result" in message:
                    result = message["result"]
            proc.wait()
        if proc.returncode != 0 or result is None:
            tail = " | ".join(log.read_text().strip().splitlines()[-3:])
            raise DuetError(f"the {label} measurement failed (exit {proc.returncode}): {tail[-400:]}")
    return result


def peak_memory(
    kind: str, path: Path, prompt: str, image_file: Path, config: DuetConfig | None
) -> float | None:
    cmd = [sys.executable, "-m", "duet_export.bench.memory", kind, str(path), prompt, str(image_file)]
    cmd.append(json.dumps(config.to_dict()) if config is not None else "null")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    lines = [x for x in proc.stdout.strip().splitlines() if x.startswith("{")]
    return json.loads(lines[-1])["peak_rss_mb"] if proc.returncode == 0 and lines else None
