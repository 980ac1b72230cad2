"""A chat-completions request body -> what one generation needs, or an `ApiError` that says what is wrong.

The server speaks the OpenAI chat-completions API as vLLM, llama.cpp's server and Ollama do: one user
message whose content is text and one `image_url` part (a `data:` URL, or with `--allow-files DIR` a path
under DIR), and `max_tokens`, `temperature`, `top_p`, `seed`, `stream`. Fields it does not know are ignored,
as the OpenAI API does; fields it knows but cannot honour (`n` above 1, `stop`) are refused rather than
silently dropped. No file outside the allowed folder is ever opened: a path is resolved (symbolic links
followed) and checked before it is read.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image

from duet_export.answers import GenerationSettings
from duet_export.errors import DuetError
from duet_export.images import open_image, open_image_bytes

__all__ = ["ApiError", "ChatRequest", "Limits", "parse_chat_request", "read_image_url"]


class ApiError(Exception):
    """A request the server refuses: the HTTP status and the OpenAI-shaped error body's fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this bundle and this server."""

    max_new_tokens: int  # the bundle's cache room for new tokens
    max_image_bytes: int = 20 * 2**20  # one image as sent (a data URL's decoded bytes, or a file's size)
    allow_files: Path | None = None  # image paths are read only from under this folder


@dataclass
class ChatRequest:
    """One parsed request: the prompt's text, where its image comes from, the decoding settings."""

    prompt: str
    image_url: str
    settings: GenerationSettings
    stream: bool
    model: str | None
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must lie in [{low:g}, {high:g}], got {value}", name)
    return float(value)


def _integer(body: dict, *names: str) -> tuple[str, int | None]:
    """The first of `names` that the body gives (OpenAI renamed max_tokens to max_completion_tokens)."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, f"'{name}' must be an integer, got {value!r}", name)
        return name, value
    return names[0], None


def _content_parts(content: Any) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise ApiError(400, "a message's 'content' must be a string or a list of parts", "messages")
    return content


def _user_message(messages: Any) -> list[dict]:
    """The parts of the one user message a fixed-shape bundle answers."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "each message must be an object with 'role' and 'content'", "messages")
    roles = [m.get("role") for m in messages]
    if roles != ["user"]:
        raise ApiError(
            400,
            f"the bundle answers one user message with its image; got roles {roles} (system prompts and "
            "earlier turns are not supported by a fixed-shape bundle)",
            "messages",
        )
    return _content_parts(messages[0].get("content"))


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """A request body (already parsed from JSON) -> `ChatRequest`, or `ApiError`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if "messages" not in body:
        raise ApiError(400, "'messages' is required", "messages")
    texts, images = [], []
    for part in _user_message(body["messages"]):
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, "a text part needs a string 'text'", "messages")
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise ApiError(400, "an image_url part needs 'image_url': {'url': ...}", "messages")
            images.append(url)
        else:
            raise ApiError(
                400, f"unsupported content part type {kind!r} (text and image_url are)", "messages"
            )
    if len(images) != 1:
        raise ApiError(400, f"the bundle takes exactly one image per request, got {len(images)}", "messages")
    prompt = "\n".join(texts).strip()
    if not prompt:
        raise ApiError(400, "the user message has no text: ask a question about the image", "messages")
    n = body.get("n")
    if n not in (None, 1):
        raise ApiError(400, f"'n' must be 1 (one answer per request), got {n!r}", "n")
    if body.get("stop"):
        raise ApiError(
            400, "'stop' sequences are not supported: the answer ends at the end-of-text token", "stop"
        )
    name, max_tokens = _integer(body, "max_completion_tokens", "max_tokens")
    max_tokens = limits.max_new_tokens if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= limits.max_new_tokens:
        raise ApiError(
            400,
            f"'{name}' must lie in [1, {limits.max_new_tokens}]: the bundle's cache holds "
            f"{limits.max_new_tokens} new tokens (export with a larger --max-new-tokens for more); got {max_tokens}",
            name,
        )
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be above 0", "top_p")
    _, seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(400, f"'seed' must be a non-negative 64-bit integer, got {seed}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    model = body.get("model")
    settings = GenerationSettings(
        max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature, top_p=top_p, seed=seed
    )
    return ChatRequest(
        prompt=prompt,
        image_url=images[0],
        settings=settings,
        stream=stream,
        model=model if isinstance(model, str) else None,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )


def read_image_url(url: str, limits: Limits) -> Image.Image:
    """The image a request names: a base64 `data:` URL, or a file under `limits.allow_files` (a path or a
    `file://` URL); size checked before decoding, pixels by the one image rule (`duet_export.images`)."""
    if url.startswith("data:"):
        return _data_url(url, limits)
    if "://" in url and not url.startswith("file://"):
        raise ApiError(
            400, "image_url must be a data: URL or a file path (the server fetches nothing)", "messages"
        )
    return _allowed_file(unquote(urlparse(url).path) if url.startswith("file://") else url, limits)


def _data_url(url: str, limits: Limits) -> Image.Image:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, "a data: URL image must be base64 (data:image/png;base64,...)", "messages")
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise ApiError(
            413,
            f"the image is larger than the server's limit of {limits.max_image_bytes:,} bytes",
            "messages",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data: URL is not valid base64", "messages") from None
    try:
        return open_image_bytes(data, "the image")
    except DuetError as e:
        raise ApiError(400, str(e), "messages") from None


def _allowed_file(path: str, limits: Limits) -> Image.Image:
    if limits.allow_files is None:
        raise ApiError(400, "image paths are refused: start the server with --allow-files DIR", "messages")
    root = limits.allow_files.resolve()
    given = Path(path)
    try:
        resolved = (given if given.is_absolute() else root / given).resolve()  # links followed, then checked
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a link loop
        raise ApiError(400, "the image path is not one the server can resolve", "messages") from None
    if not resolved.is_relative_to(root):
        raise ApiError(403, "the image path lies outside the folder given with --allow-files", "messages")
    if not resolved.is_file():
        raise ApiError(400, f"no image file {path!r} under the allowed folder", "messages")
    if os.path.getsize(resolved) > limits.max_image_bytes:
        raise ApiError(
            413,
            f"the image is larger than the server's limit of {limits.max_image_bytes:,} bytes",
            "messages",
        )
    try:
        return open_image(resolved)
    except DuetError as e:  # the message names the path as the client gave it, not where it resolved
        raise ApiError(400, str(e).replace(str(resolved), path), "messages") from None
