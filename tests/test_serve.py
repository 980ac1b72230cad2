"""`duet-export serve` driven as users drive it: the `openai` client on loopback, plain HTTP for refusals,
and a real process stopped with SIGTERM / Ctrl-C while a request is in flight."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from openai import OpenAI
from PIL import Image

from duet_export.cli import cli
from duet_export.serve import ServeOptions, make_server

from conftest import NEW_TOKENS, random_image

MAX_IMAGE_BYTES = 256 * 1024


def data_url(image: Image.Image | bytes) -> str:
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        image = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode()


def user(text: str | None, *urls: str) -> list[dict]:
    parts = [{"type": "text", "text": text}] if text is not None else []
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


class Served:
    """A server on loopback in a thread of this process (signals are tested with a real process below)."""

    def __init__(self, bundle: Path, files: Path, **options) -> None:
        opts = ServeOptions(port=0, allow_files=files, max_image_bytes=MAX_IMAGE_BYTES, **options)
        self.server, sock, self.vlm = make_server(bundle, opts)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.model = bundle.resolve().name
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The folder given to --allow-files, with a few images; an image beside it (outside) too."""
    root = tmp_path_factory.mktemp("serve")
    inside = root / "allowed"
    inside.mkdir()
    for i in range(5):
        random_image(10 + i, size=64 + 8 * i).save(inside / f"img{i}.png")
    random_image(99).save(root / "outside.png")
    (inside / "link.png").symlink_to(root / "outside.png")
    return inside


@pytest.fixture(scope="module")
def served(bundles, files):
    """The compressed CPU bundle (batch 2) served, waiting up to 300 ms for a batch to fill."""
    s = Served(bundles / "cpu", files, max_wait_ms=300)
    yield s
    s.stop()


def run_cli(bundle: Path, image: Path, prompt: str, *extra) -> tuple[str, int]:
    """`duet-export run`'s answer and prompt token count."""
    args = ["run", str(bundle), "--image", str(image), "--prompt", prompt, *map(str, extra)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    tokens = int(re.search(r"prompt tokens (\d+)", result.stderr).group(1))
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "", tokens


PROMPTS = [
    "What digit is in row 2?",
    "How many 7s are there?",
    "Is it red",
    "Describe the image",
    "What digit?",
]


def test_one_request_with_the_openai_client_answers_as_run_does(served, bundles, files):
    expected, prompt_tokens = run_cli(bundles / "cpu", files / "img0.png", PROMPTS[0])
    image = Image.open(files / "img0.png")
    reply = served.client.chat.completions.create(
        model=served.model, messages=user(PROMPTS[0], data_url(image)), temperature=0
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens == prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 1 <= usage.completion_tokens <= NEW_TOKENS
    budget = served.vlm.manifest["budget"]
    visual = usage.model_extra["visual_tokens"]
    assert visual["kept"] == budget["visual_tokens"] < visual["of_patches"] == budget["num_patches"]
    # the same image named as a file under --allow-files: relative, absolute and as a file:// URL
    for url in ("img0.png", str(files / "img0.png"), (files / "img0.png").as_uri()):
        again = served.client.chat.completions.create(
            model=served.model, messages=user(PROMPTS[0], url), temperature=0
        )
        assert again.choices[0].message.content == expected, url


def test_models_lists_the_bundle_with_its_budget_and_target(served):
    models = served.client.models.list().data
    assert [m.id for m in models] == [served.model]
    card = models[0].model_extra
    assert card["target"] == "cpu" and card["batch"] == 2 and card["max_new_tokens"] == NEW_TOKENS
    assert card["budget"] == served.vlm.manifest["budget"]
    assert served.health()["status"] == "ok"


def test_concurrent_requests_batch_and_each_answer_equals_runs(served, bundles, files):
    cases = [(files / f"img{i}.png", p) for i, p in enumerate(PROMPTS)]
    cases += [cases[0], cases[3]]  # the same question again lands in another batch, in another row
    expected = [run_cli(bundles / "cpu", image, prompt)[0] for image, prompt in cases]
    before = served.health()

    def ask(case):
        image, prompt = case
        reply = served.client.chat.completions.create(
            model=served.model, messages=user(prompt, data_url(Image.open(image))), temperature=0
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(ask, cases))
    assert answers == expected
    after = served.health()
    requests = after["batched_requests"] - before["batched_requests"]
    batches = after["batches"] - before["batches"]
    assert requests == len(cases)
    assert batches < len(cases), "no two requests shared a batch"


def test_seeded_sampling_does_not_depend_on_the_batch(served, files):
    url = data_url(Image.open(files / "img1.png"))

    def ask(seed):
        reply = served.client.chat.completions.create(
            model=served.model, messages=user(PROMPTS[1], url), temperature=1.0, top_p=0.9, seed=seed
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [7, 7, 7, 8]))
    alone = ask(7)
    assert answers[:3] == [alone] * 3
    assert answers[3] != alone  # another seed, another sample (32 random tokens)


def test_a_seeded_sample_equals_runs_on_a_batch_1_bundle(bundles, files):
    sampling = {"temperature": 0.7, "top_p": 0.9, "seed": 11}
    expected, _ = run_cli(
        bundles / "migraphx", files / "img3.png", PROMPTS[3], "--sample", "--temperature", 0.7, "--top-p", 0.9,
        "--seed", 11,
    )  # fmt: skip
    s = Served(bundles / "migraphx", files, max_wait_ms=0)
    try:
        reply = s.client.chat.completions.create(
            model=s.model, messages=user(PROMPTS[3], "img3.png"), **sampling
        )
    finally:
        s.stop()
    assert reply.choices[0].message.content == expected


def test_streaming_gives_the_same_answer_token_by_token(served, files):
    messages = user(PROMPTS[2], data_url(Image.open(files / "img2.png")))
    whole = served.client.chat.completions.create(model=served.model, messages=messages, temperature=0)
    stream = served.client.chat.completions.create(
        model=served.model,
        messages=messages,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == whole.choices[0].message.content
    assert len(deltas) > 1  # sent as it was decoded, not at the end in one piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels (a decompression bomb for the header's sake)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


GOOD = data_url(random_image(3))

# (id, request body (or raw bytes), expected status, a fragment of the error message)
BAD_REQUESTS = [
    ("not-json", b"{this is not json", 400, "not JSON"),
    ("not-an-object", [1, 2], 400, "JSON object"),
    ("no-messages", {"max_tokens": 4}, 400, "'messages' is required"),
    ("empty-messages", {"messages": []}, 400, "non-empty"),
    ("no-image", {"messages": user("hi")}, 400, "got 0"),
    ("two-images", {"messages": user("hi", GOOD, GOOD)}, 400, "got 2"),
    ("no-text", {"messages": user(None, GOOD)}, 400, "no text"),
    (
        "system-turn",
        {"messages": [{"role": "system", "content": "be brief"}, *user("hi", GOOD)]},
        400,
        "roles",
    ),
    ("not-an-image", {"messages": user("hi", data_url(b"hello, not a picture"))}, 400, "not an image"),
    ("not-base64", {"messages": user("hi", "data:image/png;base64,***")}, 400, "base64"),
    ("bomb", {"messages": user("hi", data_url(_png_header(20000, 20000)))}, 400, "decompression bomb"),
    ("too-many-bytes", {"messages": user("hi", data_url(os.urandom(MAX_IMAGE_BYTES + 1)))}, 413, "limit"),
    ("remote-url", {"messages": user("hi", "http://example.com/cat.png")}, 400, "fetches nothing"),
    ("prompt-too-long", {"messages": user("what " * 200, GOOD)}, 400, "--max-prompt"),
    (
        "max-tokens-over-cache",
        {"messages": user("hi", GOOD), "max_tokens": NEW_TOKENS + 1},
        400,
        "max_tokens",
    ),
    ("max-tokens-zero", {"messages": user("hi", GOOD), "max_tokens": 0}, 400, "max_tokens"),
    ("temperature-text", {"messages": user("hi", GOOD), "temperature": "hot"}, 400, "temperature"),
    ("temperature-high", {"messages": user("hi", GOOD), "temperature": 5}, 400, "temperature"),
    ("n-two", {"messages": user("hi", GOOD), "n": 2}, 400, "'n'"),
    ("unknown-model", {"messages": user("hi", GOOD), "model": "gpt-9"}, 404, "gpt-9"),
    ("path-outside", {"messages": user("hi", "../outside.png")}, 403, "outside"),
    ("absolute-path-outside", {"messages": user("hi", "/etc/passwd")}, 403, "outside"),
    ("link-to-outside", {"messages": user("hi", "link.png")}, 403, "outside"),
    ("missing-file", {"messages": user("hi", "nothing.png")}, 400, "no image file"),
    ("nul-in-path", {"messages": user("hi", "img0.png\u0000.txt")}, 400, "resolve"),
]


@pytest.mark.parametrize(
    "body,status,fragment", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(
    served, files, body, status, fragment, monkeypatch
):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{served.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"], error
    assert error["type"]
    outside = files.parent / "outside.png"
    assert not any(isinstance(f, (str, Path)) and Path(f).resolve() == outside for f in opened)
    good = {
        "messages": user("What digit?", GOOD),
        "max_tokens": 2,
        "frequency_penalty": 0,
        "user": "x",
        "x": [1],
    }
    reply = httpx.post(f"{served.url}/v1/chat/completions", json=good, timeout=60)  # unknown fields ignored
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] <= 2


def test_unknown_routes_get_a_json_404(served):
    response = httpx.get(f"{served.url}/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_serve_refuses_a_port_in_use_in_one_line(bundles):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", str(bundles / "cpu"), "--port", str(port)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen"), result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_the_request_in_flight_and_exits_cleanly(bundles, files, sig):
    # a batch-2 bundle waiting up to 60 s for a second request: the one request sent is still queued when
    # the signal comes, and is answered at once (the batcher stops waiting) before the process exits 0
    command = [sys.executable, "-m", "duet_export.cli", "serve", str(bundles / "cpu"), "--port", "0"]
    proc = subprocess.Popen([*command, "--max-wait-ms", "60000"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"(http://[\d.:]+)/v1", line).group(1)
        result = {}

        def ask():
            body = {
                "messages": user("What digit?", data_url(Image.open(files / "img4.png"))),
                "temperature": 0,
            }
            result["reply"] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").json()["queued"] < 1:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.05)
        signalled = time.monotonic()
        proc.send_signal(sig)
        asker.join(60)
        assert time.monotonic() - signalled < 30
        assert result["reply"].status_code == 200, result["reply"].text
        assert result["reply"].json()["choices"][0]["message"]["content"]
        assert proc.wait(60) == 0
        rest = proc.stderr.read()
        assert "Traceback" not in rest and "stopped" in rest, rest
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
