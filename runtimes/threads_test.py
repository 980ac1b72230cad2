"""Thread pools: what each setting asks of onnxruntime, and the process-wide pool's once-only rule (checked in
fresh processes, since a process-wide pool cannot be undone)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from duet_export.errors import DuetError
from duet_export.runtimes.providers import ProviderSettings
from duet_export.runtimes.session import bundle_session_options
from duet_export.runtimes.threads import DEFAULT_THREAD_POOL, THREAD_POOLS, session_options

SPIN = "session.intra_op.allow_spinning"


def test_default_sessions_sleep_when_idle():
    assert DEFAULT_THREAD_POOL == ProviderSettings().thread_pool == "no-spin"
    options = bundle_session_options(ProviderSettings())
    assert options.get_session_config_entry(SPIN) == "0"
    assert options.use_per_session_threads


def test_per_session_is_onnxruntimes_default_and_threads_are_passed_on():
    options = session_options("per-session", threads=3)
    assert options.intra_op_num_threads == 3
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises when an entry was never set
        options.get_session_config_entry(SPIN)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(DuetError, match="unknown thread pool 'spin'"):
        session_options("spin")
    with pytest.raises(DuetError, match="threads must be 0"):
        session_options("no-spin", threads=-1)


def test_cli_lists_the_runtime_thread_pools():
    from duet_export import cli

    assert cli.THREAD_POOLS == THREAD_POOLS


_MODEL = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
path = "{tmp}/relu.onnx"
open(path, "wb").write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
feed = {{"x": np.ones(2, np.float32)}}
"""


def _run(tmp_path, body: str) -> str:
    code = _MODEL.format(tmp=tmp_path) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_global_pool_is_made_once_and_every_later_session_uses_it(tmp_path):
    out = _run(
        tmp_path,
        """
        from duet_export.runtimes.session import open_session
        from duet_export.runtimes.threads import global_pool_threads, session_options
        notes = []
        cpu = [("CPUExecutionProvider", {})]
        a = open_session(path, cpu, session_options("global", threads=2))
        b = open_session(path, cpu, session_options("global", threads=1, on_note=notes.append))  # kept at 2
        c = open_session(path, cpu, session_options("no-spin", on_note=notes.append))  # moved onto it
        for s in (a, b, c):
            s.run(None, feed)
        print(global_pool_threads(), len(notes))
        """,
    )
    assert out.split() == ["2", "2"]


def test_sessions_join_a_global_pool_other_code_made(tmp_path):
    """onnxruntime refuses per-session pools once the process-wide pool exists: open_session moves them."""
    out = _run(
        tmp_path,
        """
        from onnxruntime.capi import _pybind_state
        _pybind_state.set_global_thread_pool_sizes(1, 1)
        from duet_export.runtimes.session import open_session
        session = open_session(path, [("CPUExecutionProvider", {})])
        print(session.run(None, feed)[0].tolist())
        """,
    )
    assert out.strip().endswith("[1.0, 1.0]")
