"""The HTTP side: a FastAPI app with OpenAI's chat-completions, models and a health check.

Every refusal is a 4xx with OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`), so
clients written for the OpenAI API show the message; the server goes on serving after any of them. Image
reading and tokenizing run in a worker thread under one lock (Pillow's bomb guard sets process-wide warning
filters and a fast tokenizer must not be used from two threads at once); decoding runs in the batcher's
thread, so the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from duet_export.answers import decode_answer
from duet_export.errors import DuetError, one_line
from duet_export.prompts import EncodedPrompts
from duet_export.runtimes import OnnxVLM
from duet_export.serve.batcher import Job, MicroBatcher, Stopping
from duet_export.serve.parsing import ApiError, ChatRequest, Limits, parse_chat_request, read_image_url

__all__ = ["create_app"]

MAX_BODY_SLACK = 64 * 1024  # a request body may hold one image and this much JSON besides


def create_app(vlm: OnnxVLM, batcher: MicroBatcher, model_id: str, limits: Limits) -> FastAPI:
    """The app serving `vlm` through `batcher`; its shutdown closes the batcher after draining it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="duet-export serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    lock = threading.Lock()
    manifest = vlm.manifest
    budget = manifest["budget"]
    visual = {
        "kept": int(budget["visual_tokens"]) * int(manifest["image"]["frames"]),
        "of_patches": int(budget["num_patches"]) * int(manifest["image"]["frames"]),
        "per_layer_group": budget["group_visual_tokens"],
        "average_per_layer": budget["average_tokens"],
    }
    created = int(time.time())
    counts = {"received": 0, "answered": 0, "refused": 0}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        counts["refused"] += 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        body = ApiError(500, f"internal error: {one_line(e)}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "queued": batcher.queued,
            "running": batcher.running,
            "batches": batcher.batches,
            "batched_requests": batcher.rows,
            **counts,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    def model_card() -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "duet-export",
            "family": manifest.get("family"),
            "target": manifest["target"],
            "provider": vlm.bundle.provider,
            "batch": vlm.batch,
            "max_prompt": manifest["options"].get("max_prompt"),
            "max_new_tokens": vlm.max_new_tokens,
            "budget": budget,
            "visual_tokens": visual,
        }

    def prepare(req: ChatRequest) -> EncodedPrompts:
        with lock:
            image = read_image_url(req.image_url, limits)
            try:
                return vlm.encode([image], [req.prompt])
            except DuetError as e:
                raise ApiError(400, str(e), "messages") from None

    def answer_of(ids: list[int]) -> tuple[str, list[int]]:
        """The answer's text and its tokens as `duet-export run` counts them (up to EOS, no padding)."""
        with lock:
            return decode_answer(vlm.processor.tokenizer, ids)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        counts["received"] += 1
        req = parse_chat_request(
            await _json_body(request, limits.max_image_bytes * 4 // 3 + MAX_BODY_SLACK), limits
        )
        if req.model is not None and req.model != model_id:
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist; this server has {model_id!r}",
                "model",
                "model_not_found",
            )
        enc = await run_in_threadpool(prepare, req)
        job = Job(enc, req.settings, asyncio.get_running_loop())
        try:
            batcher.submit(job)
        except Stopping:
            raise ApiError(503, "the server is shutting down", kind="server_error") from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        usage = lambda n: {  # noqa: E731
            "prompt_tokens": enc.lengths[0],
            "completion_tokens": n,
            "total_tokens": enc.lengths[0] + n,
            "visual_tokens": visual,
        }
        if req.stream:
            return StreamingResponse(
                _sse(job, head, usage, answer_of, req.include_usage, counts), media_type="text/event-stream"
            )
        ids, finish = [], None
        while finish is None:
            kind, value = await job.events.get()
            if kind == "error":
                raise value
            if kind == "token":
                ids.append(value)
            else:
                finish = value
        text, kept = await run_in_threadpool(answer_of, ids)
        counts["answered"] += 1
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": usage(len(kept)),
        }

    return app


async def _json_body(request: Request, limit: int) -> Any:
    """The body as JSON, read up to `limit` bytes (413 past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than the server's limit of {limit:,} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is larger than the server's limit of {limit:,} bytes")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not JSON: {one_line(e)}") from None


async def _sse(
    job: Job, head: dict, usage, answer_of, include_usage: bool, counts: dict
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: a role chunk, text deltas, a finish chunk, [DONE]."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        body = {**head, "object": "chat.completion.chunk", "choices": [choice], **extra}
        return f"data: {json.dumps(body)}\n\n"

    ids: list[int] = []
    sent = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                error = ApiError(500, f"internal error: {one_line(value)}", kind="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            if kind == "done":
                break
            ids.append(value)
            # the text so far, trailing spaces held back (the final answer is stripped); a partial
            # multi-byte character decodes as U+FFFD until its last byte arrives
            text = (await run_in_threadpool(answer_of, ids))[0].rstrip()
            if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                yield chunk({"content": text[len(sent) :]})
                sent = text
        text, kept = await run_in_threadpool(answer_of, ids)
        if text.startswith(sent) and len(text) > len(sent):
            yield chunk({"content": text[len(sent) :]})
        yield chunk({}, value, **({"usage": None} if include_usage else {}))
        if include_usage:
            body = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(len(kept))}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
        counts["answered"] += 1
    finally:
        job.cancelled = True  # a client gone mid-stream frees its row; after the end this changes nothing
