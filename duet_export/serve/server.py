"""Start `duet-export serve`: open the bundle, bind the socket, run uvicorn until SIGTERM or Ctrl-C.

On a signal uvicorn stops accepting connections and waits for the requests in flight; the batcher is told
to stop waiting for batches to fill, so queued requests run at once, and the app's shutdown then drains and
stops it. The process exits with status 0 after a drain (uvicorn's own `Server` re-raises the signal
afterwards, which would end the process by that signal instead).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from duet_export.errors import DuetError
from duet_export.runtimes import OnnxVLM, ProviderSettings
from duet_export.serve.app import create_app
from duet_export.serve.batcher import MicroBatcher
from duet_export.serve.parsing import Limits

__all__ = ["ServeOptions", "make_server", "serve"]


@dataclass(frozen=True)
class ServeOptions:
    """How `serve` listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "auto"
    max_wait_ms: float = 10.0
    allow_files: str | os.PathLike | None = None
    model_name: str | None = None  # the model id clients send; default: the bundle folder's name
    max_image_bytes: int = 20 * 2**20
    access_log: bool = False


class _DrainingServer(uvicorn.Server):
    """uvicorn's server that flushes the batcher on the first signal and exits normally after draining."""

    def __init__(self, config: uvicorn.Config, batcher: MicroBatcher) -> None:
        super().__init__(config)
        self.batcher = batcher

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        self.batcher.flush()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():  # tests run servers in threads
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (port taken, unknown host) before the bundle is opened."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        raise DuetError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def make_server(
    bundle: str | os.PathLike,
    options: ServeOptions,
    settings: ProviderSettings | None = None,
    on_note: Callable[[str], None] | None = None,
) -> tuple[uvicorn.Server, socket.socket, OnnxVLM]:
    """The server, its listening socket (bound, so a client may connect before `run`) and the bundle."""
    allow = None
    if options.allow_files is not None:
        allow = Path(options.allow_files)
        if not allow.is_dir():
            raise DuetError(f"--allow-files {allow}: no such folder")
    if not 0 <= options.max_wait_ms <= 60_000:
        raise DuetError(f"--max-wait-ms must lie in [0, 60000], got {options.max_wait_ms}")
    if not 0 <= options.port <= 65535:
        raise DuetError(f"--port must lie in [0, 65535], got {options.port}")
    sock = _listen(options.host, options.port)
    try:
        vlm = OnnxVLM(bundle, options.provider, settings, on_note=on_note)
        if vlm.manifest["image"].get("media", "image") != "image":
            raise DuetError(f"{bundle} is a video bundle: serve answers image bundles only (for now)")
    except BaseException:
        sock.close()
        raise
    batcher = MicroBatcher(vlm, options.max_wait_ms / 1000)
    limits = Limits(vlm.max_new_tokens, options.max_image_bytes, allow)
    model_id = options.model_name or Path(bundle).resolve().name
    app = create_app(vlm, batcher, model_id, limits)
    config = uvicorn.Config(app, log_level="warning", access_log=options.access_log, lifespan="on")
    return _DrainingServer(config, batcher), sock, vlm


def serve(
    bundle: str | os.PathLike,
    options: ServeOptions,
    settings: ProviderSettings | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Serve `bundle` until SIGTERM / Ctrl-C; `echo` gets the line saying where (the port, if 0 was asked)."""
    server, sock, vlm = make_server(bundle, options, settings, on_note=lambda m: echo(f"note: {m}"))
    host, port = sock.getsockname()[:2]
    m = vlm.manifest
    echo(
        f"serving {Path(bundle)} ({m['target']} bundle, batch {vlm.batch}, {m['budget']['visual_tokens']} "
        f"visual tokens) with {vlm.bundle.provider} on http://{host}:{port}/v1"
    )
    server.run(sockets=[sock])
    echo("stopped: every request in flight was answered")
