"""Load on `duet-export serve`: throughput and latency under concurrent clients, no request lost or answered
twice, and the server's memory over a long run. Loopback only; bounded in requests and in time.

    .venv/bin/python benchmarks/serve_load.py --workdir runs/serve-load

For `--batch 1` and `--batch 4` bundles of the llava-1.5-mini shape (random weights, LLaVA-1.5 geometry;
built and exported once under --workdir), each served by its own `duet-export serve` process:
- for 1, 4 and 16 concurrent clients (each sends its next request when the last is answered), requests per
  second and p50 / p99 latency over `--requests` requests (or `--max-seconds`, whichever ends first);
- every request is checked: exactly one 200 answer per request sent, every completion id distinct, the
  server's own count of requests it batched grew by exactly the number sent, and each answer equals the
  answer its (image, prompt) got when sent alone (greedy), so no row of a batch got another's answer;
- then `--memory-requests` requests at 16 clients on the batch-4 bundle, with the server's RSS read from
  /proc every 0.25 s: its growth from the run's first tenth to its last tenth is reported.
The clients share the machine's cores with the server (loopback), as they would on one host.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

SHAPE = "llava-1.5-mini"
CLIENTS = (1, 4, 16)
BATCHES = (1, 4)


def export_bundles(workdir: Path, budget: float, max_tokens: int) -> dict[int, Path]:
    """The mini shape's bundles, one per batch size (exported once; reused while their folder exists)."""
    out = {b: workdir / f"mini-budget{budget:g}-new{max_tokens}-batch{b}" for b in BATCHES}
    if all((p / "manifest.json").is_file() for p in out.values()):
        return out
    from duet_export.bench.artifacts import ensure_model
    from duet_export.export.bundle import ExportOptions, export_bundle
    from duet_export.loading import load
    from duet_export.stages.budget import resolve_budget

    model = ensure_model(SHAPE, workdir, echo=print)
    loaded = load(model)
    config = resolve_budget(budget, loaded.adapter.geometry(), rules=loaded.adapter.rules)
    for batch, path in out.items():
        if not (path / "manifest.json").is_file():
            print(f"exporting {path.name}", flush=True)
            options = ExportOptions("cpu", max_prompt=32, max_new_tokens=max_tokens, batch=batch)
            export_bundle(loaded, path, config, options, echo=lambda m: None, force=True)
    return out


def cases(count: int = 4) -> list[dict]:
    """Distinct (image, prompt) requests: random 336 px images, questions of different lengths."""
    words = ["what", "digit", "is", "in", "the", "image", "how", "many", "are", "there", "row", "column"]
    out = []
    for k in range(count):
        rng = np.random.default_rng(k)
        buf = io.BytesIO()
        Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8")).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        prompt = " ".join(words[(k + i) % len(words)] for i in range(4 + 3 * k)) + "?"
        out.append(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        )
    return out


class Server:
    """`duet-export serve BUNDLE --port 0` in its own process; `stop` sends SIGTERM and checks exit 0."""

    def __init__(self, bundle: Path, max_wait_ms: float) -> None:
        command = [sys.executable, "-m", "duet_export.cli", "serve", str(bundle), "--port", "0"]
        self.proc = subprocess.Popen(
            [*command, "--max-wait-ms", str(max_wait_ms)], stderr=subprocess.PIPE, text=True
        )
        line = self.proc.stderr.readline()
        found = re.search(r"(http://[\d.:]+)/v1", line)
        if not found:
            self.proc.kill()
            raise SystemExit(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.url = found.group(1)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def load(
    server: Server,
    messages: list[dict],
    references: list[str],
    clients: int,
    requests: int,
    max_tokens: int,
    max_seconds: float,
    on_done=None,
) -> dict:
    """`requests` requests from `clients` threads, each waiting for its answer before the next; checked."""
    lock = threading.Lock()
    state = {"next": 0}
    results: list[tuple[int, int, str, str, float]] = []  # (request, status, id, answer, seconds)
    stop_at = time.monotonic() + max_seconds
    before = server.health()
    # the bodies encoded once: the clients share the server's cores and should spend as little as they can
    bodies = [
        json.dumps({"messages": [m], "temperature": 0, "max_tokens": max_tokens}).encode() for m in messages
    ]
    headers = {"content-type": "application/json"}

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = state["next"]
                    if i >= requests or time.monotonic() > stop_at:
                        return
                    state["next"] += 1
                start = time.perf_counter()
                reply = http.post(
                    f"{server.url}/v1/chat/completions", content=bodies[i % len(bodies)], headers=headers
                )
                seconds = time.perf_counter() - start
                data = reply.json()
                answer = (
                    data["choices"][0]["message"]["content"] if reply.status_code == 200 else json.dumps(data)
                )
                with lock:
                    results.append((i, reply.status_code, data.get("id", ""), answer, seconds))
                if on_done is not None:
                    on_done(len(results))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    after = server.health()
    sent = state["next"]
    latencies = sorted(r[4] for r in results)
    batched = after["batched_requests"] - before["batched_requests"]
    batches = after["batches"] - before["batches"]
    wrong = [r[0] for r in results if r[1] != 200 or r[3] != references[r[0] % len(references)]]
    return {
        "clients": clients,
        "sent": sent,
        "answered": len(results),
        "all_200": all(r[1] == 200 for r in results),
        "distinct_ids": len({r[2] for r in results}),
        "distinct_requests": len({r[0] for r in results}),
        "server_batched": batched,
        "server_answered": after["answered"] - before["answered"],
        "mean_batch": batched / batches if batches else 0.0,
        "wrong_answers": wrong,
        "seconds": elapsed,
        "requests_per_s": len(results) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(np.ceil(0.99 * len(latencies))) - 1)],
    }


def exact(row: dict) -> bool:
    """No request lost or answered twice, none answered with another's answer."""
    n = row["sent"]
    return (
        row["answered"] == row["distinct_requests"] == row["distinct_ids"] == row["server_batched"] == n
        and row["server_answered"] == n
        and row["all_200"]
        and not row["wrong_answers"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/serve-load"))
    parser.add_argument("--budget", type=float, default=192, help="Average visual tokens per decoder layer.")
    parser.add_argument("--requests", type=int, default=64, help="Requests per (bundle, clients) row.")
    parser.add_argument("--max-tokens", type=int, default=8, help="New tokens per answer (greedy).")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-seconds", type=float, default=180, help="Time bound of one row.")
    parser.add_argument("--memory-requests", type=int, default=1000, help="0: no memory run.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundles = export_bundles(args.workdir, args.budget, args.max_tokens)
    messages = cases()
    results: dict = {"rows": [], "settings": {k: str(v) for k, v in vars(args).items()}}
    print("| bundle | clients | requests | req/s | p50 ms | p99 ms | mean batch | exact |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, bundle in bundles.items():
        server = Server(bundle, args.max_wait_ms)
        # the answers alone (one client, one at a time) are the references; the first also warms up
        references = []
        for m in messages:
            with httpx.Client(timeout=300) as http:
                body = {"messages": [m], "temperature": 0, "max_tokens": args.max_tokens}
                references.append(
                    http.post(f"{server.url}/v1/chat/completions", json=body).json()["choices"][0]["message"][
                        "content"
                    ]
                )
        for clients in CLIENTS:
            row = load(
                server,
                messages,
                references,
                clients,
                max(args.requests, clients),
                args.max_tokens,
                args.max_seconds,
            )
            row |= {"batch": batch, "exact": exact(row)}
            results["rows"].append(row)
            print(
                f"| batch {batch} | {clients} | {row['answered']} | {row['requests_per_s']:.2f} | {row['p50_ms']:.0f} "
                f"| {row['p99_ms']:.0f} | {row['mean_batch']:.2f} | {'yes' if row['exact'] else 'NO'} |",
                flush=True,
            )
        if batch == max(BATCHES) and args.memory_requests:
            results["memory"] = memory_run(server, messages, references, args)
        results.setdefault("exit_codes", {})[f"batch{batch}"] = server.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


def memory_run(server: Server, messages, references, args) -> dict:
    """`--memory-requests` at 16 clients with the server's RSS sampled; growth from first to last tenth."""
    samples: list[tuple[int, float]] = []  # (requests answered so far, RSS MiB)
    done = {"n": 0}
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            samples.append((done["n"], server.rss_mib()))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    row = load(
        server,
        messages,
        references,
        16,
        args.memory_requests,
        args.max_tokens,
        10 * args.max_seconds,
        on_done=lambda n: done.__setitem__("n", n),
    )
    running.clear()
    sampler.join()
    n = row["answered"]
    first = [r for k, r in samples if k <= n / 10] or [samples[0][1]]
    last = [r for k, r in samples if k >= 0.9 * n] or [samples[-1][1]]
    out = {
        "requests": n,
        "exact": exact(row),
        "requests_per_s": row["requests_per_s"],
        "rss_first_tenth_mib": statistics.median(first),
        "rss_last_tenth_mib": statistics.median(last),
        "rss_max_mib": max(r for _, r in samples),
        "rss_by_tenth_mib": [round(statistics.median(part), 1) for part in _tenths(samples, n) if part],
    }
    out["growth_mib"] = out["rss_last_tenth_mib"] - out["rss_first_tenth_mib"]
    print(
        f"memory: {n} requests at 16 clients, {row['requests_per_s']:.2f} req/s, exact {'yes' if out['exact'] else 'NO'}; "
        f"server RSS {out['rss_first_tenth_mib']:.0f} MiB over the first tenth -> {out['rss_last_tenth_mib']:.0f} MiB "
        f"over the last (max {out['rss_max_mib']:.0f}); by tenth: {out['rss_by_tenth_mib']}",
        flush=True,
    )
    return out


def _tenths(samples: list[tuple[int, float]], n: int) -> list[list[float]]:
    """The RSS samples taken while the k-th tenth of the requests was being answered, for k = 1..10."""
    return [
        [r for k, r in samples if n * t / 10 <= k < n * (t + 1) / 10 or (t == 9 and k == n)]
        for t in range(10)
    ]


if __name__ == "__main__":
    main()
