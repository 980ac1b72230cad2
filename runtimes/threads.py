"""How a bundle's onnxruntime sessions share the CPU cores: the `SessionOptions` every session gets.

A bundle runs three sessions (vision, prefill, step) in turn. By default onnxruntime gives each session its
own intra-op pool whose threads keep spinning after a run, so the next session (or PyTorch, or anything else
in the process or on the machine) shares the cores with threads that do nothing. Three ways out:

- `no-spin` (the default): each session keeps its own pool, but idle threads sleep
  (`session.intra_op.allow_spinning` = "0"). No process-wide state: other onnxruntime sessions in the same
  process are unaffected.
- `global`: one process-wide pool for every session (`use_per_session_threads = False` on a pool made with
  `set_global_thread_pool_sizes`). onnxruntime creates that pool once per process and then refuses any
  session that asks for its own pool, including sessions opened by other code with default options; and
  its threads still spin. Opt in where the process runs nothing but bundles.
- `per-session`: onnxruntime's own default (spinning pools), for comparison.

Measured on the llava-1.5-mini bundles (2 cores shared with other jobs, one process per mode, budget 64):
time to first token 276 ms with spinning per-session pools, 206 ms with the global pool, 103-119 ms with
`no-spin`; decode 22, 18 and 10-12 ms a token. See docs/bench.md for the command.
"""

from __future__ import annotations

from collections.abc import Callable

import onnxruntime as ort

from duet_export.errors import DuetError

__all__ = ["DEFAULT_THREAD_POOL", "THREAD_POOLS", "global_pool_threads", "on_global_pool", "session_options"]

THREAD_POOLS = ("no-spin", "global", "per-session")
DEFAULT_THREAD_POOL = "no-spin"

# What onnxruntime says when a session asks for its own pool after the process-wide one exists.
GLOBAL_POOL_REFUSAL = "use_per_session_threads must be false when using a global thread pool"

_global: dict[str, int | None] = {}  # "threads": the intra-op size of the process-wide pool, once made


def global_pool_threads() -> int | None:
    """The intra-op size of the process-wide pool if one exists in this process (0: onnxruntime's
    choice), else None."""
    return _global.get("threads")


def _ensure_global_pool(threads: int, on_note: Callable[[str], None]) -> None:
    """Create the process-wide pool once; later requests reuse it (onnxruntime cannot replace it)."""
    if "threads" in _global:
        if threads and _global["threads"] not in (threads, None):
            on_note(
                f"the process-wide thread pool already has {_global['threads'] or 'the default'} threads; "
                "onnxruntime cannot resize it, so it is kept"
            )
        return
    from onnxruntime.capi import _pybind_state

    try:
        _pybind_state.set_global_thread_pool_sizes(threads, 1)
        _global["threads"] = threads
    except Exception as e:  # made earlier by other code in this process: use it as it is
        if "already been created" not in str(e):
            raise DuetError(f"onnxruntime cannot create a process-wide thread pool: {e}") from None
        _global["threads"] = None


def session_options(
    thread_pool: str = DEFAULT_THREAD_POOL,
    threads: int = 0,
    on_note: Callable[[str], None] | None = None,
) -> ort.SessionOptions:
    """`SessionOptions` for one of a bundle's sessions under `thread_pool` (see the module docstring);
    `threads` intra-op threads (0: onnxruntime's choice, one per physical core).

    Once a process-wide pool exists, onnxruntime refuses sessions with their own pool, so every later
    session uses the process-wide one whatever it asked for (with a note)."""
    on_note = on_note or (lambda message: None)
    if thread_pool not in THREAD_POOLS:
        raise DuetError(f"unknown thread pool {thread_pool!r} (choose from {', '.join(THREAD_POOLS)})")
    if threads < 0:
        raise DuetError(f"threads must be 0 (onnxruntime's choice) or more, got {threads}")
    options = ort.SessionOptions()
    if "threads" in _global and thread_pool != "global":
        on_note(
            f"a process-wide thread pool exists in this process, so {thread_pool} is not possible: using it"
        )
        thread_pool = "global"
    if thread_pool == "global":
        _ensure_global_pool(threads, on_note)
        options.use_per_session_threads = False
        return options
    options.intra_op_num_threads = threads
    if thread_pool == "no-spin":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def on_global_pool(options: ort.SessionOptions) -> ort.SessionOptions:
    """The same options moved onto the process-wide pool (after onnxruntime refused a per-session pool
    because other code in this process made the process-wide one)."""
    _global.setdefault("threads", None)
    options.use_per_session_threads = False
    return options
