"""Micro-batching: requests wait in one queue and run together, up to the bundle's fixed batch.

A bundle's batch is fixed at export (`--batch N`), so N waiting requests cost about what one does. One
worker thread owns the bundle's sessions: it takes the oldest request, waits at most `max_wait` from that
request's arrival for others to fill the batch, fills the remaining rows with copies of the first prompt
(their output is discarded, as `OnnxVLM.generate` does) and decodes every row with that row's own settings
and random generator. Rows do not see each other, so a request's answer does not depend on the batch it
landed in: greedy answers equal `duet-export run`'s, and a seeded sampled answer equals `run --sample
--seed S` on a batch-1 bundle.

Tokens go back to each request's event loop as they are chosen (`Job.events`), which is what streaming
needs; a request whose client went away is marked cancelled and its row stops being decoded.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duet_export.answers import GenerationSettings
from duet_export.prompts import EncodedPrompts
from duet_export.runtimes import OnnxVLM, choose_tokens

__all__ = ["Job", "MicroBatcher", "Stopping"]


class Stopping(RuntimeError):
    """The server is shutting down and takes no new requests."""


@dataclass(eq=False)
class Job:
    """One request in the queue: its encoded prompt (one row), its settings, where its tokens go."""

    inputs: EncodedPrompts
    settings: GenerationSettings
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    batch_rows: int = 0  # how many real requests its batch held (for tests and logs)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.settings.seed)

    def emit(self, kind: str, value: Any = None) -> None:
        """("token", id), ("done", finish_reason) or ("error", exception), to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self.cancelled = True


class MicroBatcher:
    """The queue and its one worker thread; `submit` from any thread, `close` drains and stops."""

    def __init__(self, vlm: OnnxVLM, max_wait: float = 0.010) -> None:
        self.vlm = vlm
        self.batch = vlm.batch
        self.max_wait = max_wait
        tokens = vlm.manifest["tokens"]
        self.eos = tokens["eos_token_id"]
        self.pad = tokens["pad_token_id"] if tokens["pad_token_id"] is not None else (self.eos or 0)
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._flush = False
        self.running = 0  # requests in the batch being decoded
        self.batches = 0
        self.rows = 0
        self._thread = threading.Thread(target=self._work, name="duet-serve-batcher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        """Queue `job`; `Stopping` once `close` has been called."""
        with self._cond:
            if self._stopping:
                raise Stopping("the server is shutting down")
            self._queue.append(job)
            self._cond.notify()

    def flush(self) -> None:
        """Stop waiting for batches to fill (shutdown has begun: run what is queued now)."""
        with self._cond:
            self._flush = True
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish every queued one, stop the worker."""
        with self._cond:
            self._stopping = self._flush = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and those that arrive within `max_wait` of it (None: stopped)."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = self._queue[0].submitted + self.max_wait
            while len(self._queue) < self.batch and not self._flush:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
        return [j for j in jobs if not j.cancelled]

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            if not jobs:
                continue
            self.running = len(jobs)
            try:
                self._generate(jobs)
            except Exception as e:  # one failed batch fails its requests, not the server
                for job in jobs:
                    job.emit("error", e)
            finally:
                self.running = 0
                self.batches += 1
                self.rows += len(jobs)

    def _inputs(self, jobs: list[Job]) -> dict[str, np.ndarray]:
        """The jobs' rows stacked, and copies of the first to fill the bundle's batch."""
        rows = [j.inputs for j in jobs] + [jobs[0].inputs] * (self.batch - len(jobs))

        def query(enc: EncodedPrompts) -> np.ndarray:
            return enc.query_mask if enc.query_mask is not None else np.zeros_like(enc.input_ids, dtype=bool)

        return {
            "input_ids": np.concatenate([r.input_ids for r in rows]),
            "attention_mask": np.concatenate([r.attention_mask for r in rows]),
            "query_mask": np.concatenate([query(r) for r in rows]),
            "pixel_values": np.concatenate([r.pixel_values for r in rows]).astype(self.vlm.float_dtype),
        }

    def _generate(self, jobs: list[Job]) -> None:
        """Prefill once for the batch, then decode until every row has ended (EOS or its max_tokens)."""
        for job in jobs:
            job.batch_rows = len(jobs)
        logits, state = self.vlm.prefill(self._inputs(jobs))
        left = [j.settings.max_new_tokens for j in jobs]
        active = [True] * len(jobs)
        while True:
            chosen = np.full(self.batch, self.pad, dtype=np.int64)
            for i, job in enumerate(jobs):
                if not active[i]:
                    continue
                if job.cancelled:
                    active[i] = False
                    continue
                token = int(choose_tokens(logits[i : i + 1], job.settings, job.rng)[0])
                chosen[i] = token
                left[i] -= 1
                job.emit("token", token)
                if token == self.eos or left[i] == 0:
                    active[i] = False
                    job.emit("done", "stop" if token == self.eos else "length")
            if not any(active):
                return
            logits = self.vlm.step(chosen, state)
