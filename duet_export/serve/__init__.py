"""`duet-export serve`: an OpenAI-compatible HTTP server for a bundle, with micro-batching.

    duet-export serve bundle/ --port 8000
    curl http://127.0.0.1:8000/v1/models

Needs the `serve` extra (`pip install -e '.[serve]'`: FastAPI and uvicorn). `parsing` reads a
chat-completions body, `batcher` runs queued requests together up to the bundle's batch, `app` is the HTTP
side and `server` starts it and drains it on SIGTERM / Ctrl-C.
"""

from duet_export.serve.server import ServeOptions, make_server, serve

__all__ = ["ServeOptions", "make_server", "serve"]
