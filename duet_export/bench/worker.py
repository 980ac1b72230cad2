"""Time one backend in a process of its own: `python -m duet_export.bench.worker SPEC.json`.

`bench` starts one worker per backend (onnxruntime under each thread-pool setting, PyTorch eager), one
after another, so no backend's threads share the cores with another's while it is timed. A worker times
every configuration of its spec, prints `{"progress": [done, total]}` after each round and one
`{"result": ...}` line at the end.

Rounds: every configuration once per round, warm-up rounds first. Interleaved (the default, when every
configuration's sessions fit in memory at once), measured rounds alternate between the listed order and
its reverse, so `order_effect` (medians of forward vs reversed rounds) says whether a configuration's figure
depends on what ran before it. A configuration too large to hold beside the others is timed on its own:
opened, its rounds run, closed.

What each side times:
- onnxruntime: vision and prefill are their session runs; TTFT is `OnnxVLM.prefill` (vision, prefill and
  the cache set-up) plus the first token's argmax; decode is one `OnnxVLM.step` plus its argmax.
- PyTorch eager: one forward of the whole model, prompt in, first token out, timed as TTFT; a pre-forward
  hook on the first decoder layer marks where vision (tower, Stage 1, projector, embedding) ends and the
  decoder (with Stage 2) begins, within that same call; decode is one cached forward plus its argmax.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "run_worker"]


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _round_orders(cases: list[dict], rounds: int, warmup: int) -> Iterator[tuple[int, list[dict], int]]:
    """(round, cases in the order to run them, direction): measured rounds alternate forward (0) and
    reversed (1), so both directions are measured as evenly as the count allows."""
    for r in range(rounds):
        direction = (r - warmup) % 2 if r >= warmup else 0
        yield r, (cases if direction == 0 else cases[::-1]), direction


class _OnnxSide:
    """One configuration on onnxruntime: a bundle opened with the spec's provider and thread pool."""

    def __init__(self, case: dict, spec: dict) -> None:
        from duet_export.runtimes import OnnxVLM, ProviderSettings

        settings = ProviderSettings(
            thread_pool=spec.get("thread_pool", "no-spin"),
            threads=int(spec.get("threads", 0)),
            cuda_graph=bool(spec.get("cuda_graph", False)),
            share_weights=bool(spec.get("share_weights", False)),
        )
        self.vlm = OnnxVLM(case["bundle"], provider=spec.get("provider", "cpu"), settings=settings)
        self.inputs = self.vlm._pad_batch(self.vlm.encode([case["image"]], [case["prompt"]]))
        self.tokens = int(self.vlm.prompt_length)

    def round(self, decode_tokens: int) -> dict[str, float]:
        vlm = self.vlm
        start = time.perf_counter()
        logits, state = vlm.prefill(self.inputs)
        token = logits.argmax(-1)
        ttft = time.perf_counter() - start
        steps = []
        for _ in range(decode_tokens):
            s = time.perf_counter()
            token = vlm.step(token, state).argmax(-1)
            steps.append(time.perf_counter() - s)
        out = {"vision": state.timings["vision"], "prefill": state.timings["prefill"], "ttft": ttft}
        if steps:
            out["decode"] = float(np.median(steps))
        return out

    def extras(self) -> dict[str, Any]:
        """Bytes between host and device per decode step (instrumented), with the cache where it ran and,
        for comparison, with the host-side numpy loop on the same sessions (two untimed steps)."""
        from duet_export.runtimes import OnnxVLM

        report = self.vlm.transfer_report()
        host = OnnxVLM(self.vlm.bundle, device_cache=False)
        logits, state = host.prefill(self.inputs)
        token = logits.argmax(-1)
        for _ in range(min(2, host.max_new_tokens)):
            token = host.step(token, state).argmax(-1)
        report["host_cache_per_step_bytes"] = host.transfer_report()["per_step_bytes"]
        return {"transfers": report}

    def close(self) -> None:
        del self.vlm


class _EagerSide:
    """One configuration on PyTorch eager: the shared model, compressed with this case's config."""

    def __init__(self, case: dict, loaded, first_layer, device: str = "cpu") -> None:
        import torch

        from duet_export.config import DuetConfig
        from duet_export.inputs import prepare_inputs
        from duet_export.loading import load_visual

        self.loaded, self.first_layer = loaded, first_layer
        self.config = DuetConfig.from_dict(case["config"]) if case.get("config") else None
        visual = load_visual(case["image"], loaded.adapter)
        inputs = prepare_inputs(loaded.processor, loaded.adapter, [visual], [case["prompt"]], self.config)
        dtype = next(loaded.model.parameters()).dtype
        self.inputs = {
            k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in inputs.items()
        }
        self.tokens = int(self.inputs["input_ids"].shape[1])
        # CUDA runs asynchronously: read the clock only once the device has finished
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def round(self, decode_tokens: int) -> dict[str, float]:
        import torch

        from duet_export.compression import compress, decompress

        model = self.loaded.model
        if self.config is not None:
            compress(model, self.config)
        else:
            decompress(model)
        marks: list[float] = []

        def mark(module, args) -> None:
            self.sync()
            marks.append(time.perf_counter())

        hook = self.first_layer.register_forward_pre_hook(mark)
        try:
            with torch.no_grad():
                self.sync()
                start = time.perf_counter()
                out = model(**self.inputs, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                self.sync()
                ttft = time.perf_counter() - start
        finally:
            hook.remove()
        decoder_start = marks[0]
        cache, mask = out.cache, self.inputs["attention_mask"]
        steps = []
        with torch.no_grad():
            for _ in range(decode_tokens):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                self.sync()
                s = time.perf_counter()
                out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                self.sync()
                steps.append(time.perf_counter() - s)
                cache = out.cache
        decompress(model)
        result = {"vision": decoder_start - start, "prefill": start + ttft - decoder_start, "ttft": ttft}
        if steps:
            result["decode"] = float(np.median(steps))
        return result

    def extras(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def _sides(spec: dict) -> Callable[[dict], Any]:
    """A factory of per-configuration sides for the spec's backend."""
    if spec["backend"] == "onnxruntime":
        return lambda case: _OnnxSide(case, spec)
    import torch
    import transformers

    from duet_export.loading import load

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))
    device = spec.get("device", "cpu")
    loaded = load(spec["model_dir"], dtype=getattr(torch, spec.get("dtype", "float32")), device=device)
    first_layer = loaded.adapter.decoder_layers[0]
    return lambda case: _EagerSide(case, loaded, first_layer, device)


@contextmanager
def _opened(make, case: dict):
    side = make(case)
    try:
        yield side
    finally:
        side.close()


def run_worker(spec: dict, emit: Callable[[dict], None] = _emit) -> dict:
    """Time every configuration of `spec` on its backend (see the module docstring); returns the result."""
    cases, warmup, repeats = spec["cases"], int(spec["warmup"]), int(spec["repeats"])
    decode_tokens = int(spec.get("decode_tokens", 0))
    rounds = warmup + repeats
    make = _sides(spec)
    values: dict[str, dict[str, list[float]]] = {c["name"]: {} for c in cases}
    order: dict[str, list[int]] = {c["name"]: [] for c in cases}
    info: dict[str, dict[str, Any]] = {c["name"]: {} for c in cases}

    def record(case: dict, side, r: int, direction: int) -> None:
        timings = side.round(decode_tokens)
        if r >= warmup:
            for key, value in timings.items():
                values[case["name"]].setdefault(key, []).append(value)
            order[case["name"]].append(direction)

    total = rounds * len(cases) if not spec.get("interleave", True) else rounds
    if spec.get("interleave", True):
        sides = {c["name"]: make(c) for c in cases}
        for r, ordered, direction in _round_orders(cases, rounds, warmup):
            for case in ordered:
                record(case, sides[case["name"]], r, direction)
            emit({"progress": [r + 1, total]})
        for case in cases:
            info[case["name"]] = {"tokens": sides[case["name"]].tokens, **sides[case["name"]].extras()}
            sides[case["name"]].close()
    else:
        done = 0
        for case in cases:
            with _opened(make, case) as side:
                for r in range(rounds):
                    record(case, side, r, 0)
                    done += 1
                    emit({"progress": [done, total]})
                info[case["name"]] = {"tokens": side.tokens, **side.extras()}
    result = {
        "label": spec.get("label", spec["backend"]),
        "backend": spec["backend"],
        "interleaved": bool(spec.get("interleave", True)),
        "cases": {name: {"values": values[name], "order": order[name], **info[name]} for name in values},
    }
    if spec["backend"] == "eager":
        import torch

        result["torch_threads"] = torch.get_num_threads()
    return result


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    _emit({"result": run_worker(spec)})


if __name__ == "__main__":
    main(sys.argv[1:])
