"""Worker rounds into figures: passes merged per backend, medians and order effects, ratios per row."""

from __future__ import annotations

import numpy as np


def summary(values: list[float]) -> dict[str, float]:
    """Median and interquartile range (p25, p75) of one figure's rounds."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p25": float(np.percentile(a, 25)),
        "p75": float(np.percentile(a, 75)),
    }


def order_effect(values: list[float], order: list[int]) -> float | None:
    """|median of forward rounds - median of reversed rounds| / median: how much a figure depends on which
    configuration ran before it (None without rounds of both directions)."""
    a, o = np.asarray(values, dtype=np.float64), np.asarray(order)
    if len(a) != len(o) or not (o == 0).any() or not (o == 1).any():
        return None
    return float(abs(np.median(a[o == 0]) - np.median(a[o == 1])) / np.median(a))


def merge_pass(backends: dict[str, dict], spec: dict, result: dict) -> None:
    """Add one worker pass's rounds to its backend's (values and round directions appended)."""
    entry = backends.setdefault(
        spec["label"], {**{k: v for k, v in result.items() if k != "cases"}, "cases": {}}
    )
    entry["passes"] = entry.get("passes", 0) + 1
    if "thread_pool" in spec:
        entry["thread_pool"] = spec["thread_pool"]
    for name, case in result["cases"].items():
        into = entry["cases"].setdefault(name, {"values": {}, "order": []})
        for key, values in case["values"].items():
            into["values"].setdefault(key, []).extend(values)
        into["order"].extend(case["order"])
        into.update({k: v for k, v in case.items() if k not in ("values", "order")})


def fill_timings(rows: list[dict], backends: dict[str, dict], primary: str) -> None:
    """Per row: every backend's summaries and order effects; the primary onnxruntime backend's and eager's
    under `onnx_*` / `eager_*`, and the ratios between them."""
    for row in rows:
        row["backends"], row["order_effect"], row["decoder_tokens"], row["transfers"] = {}, {}, {}, {}
        for label, backend in backends.items():
            case = backend["cases"].get(row["name"])
            if case is None:
                continue
            row["backends"][label] = {k: summary(v) for k, v in case["values"].items()}
            row["order_effect"][label] = {
                k: order_effect(v, case["order"]) for k, v in case["values"].items()
            }
            row["decoder_tokens"][label] = case.get("tokens")
            if case.get("transfers"):
                row["transfers"][label] = case["transfers"]
        timings = {f"onnx_{k}": v for k, v in row["backends"].get(primary, {}).items()}
        row["eager_backend"] = {}
        eager = {label: t for label, t in row["backends"].items() if label.startswith("PyTorch eager")}
        for key in ("ttft", "decode"):  # the faster eager setting, metric by metric (vision/prefill: TTFT's)
            timed = {label: t for label, t in eager.items() if key in t}
            if timed:
                best = min(timed, key=lambda label: timed[label][key]["median"])
                row["eager_backend"][key] = best
                timings[f"eager_{key}"] = timed[best][key]
                if key == "ttft":
                    for part in ("vision", "prefill"):
                        timings[f"eager_{part}"] = timed[best][part]
        row["timings"] = timings
    full = rows[0]["timings"]
    for row in rows:
        t = row["timings"]
        row["flop_ideal_speedup"] = rows[0]["flops_total"] / row["flops_total"]
        if "onnx_ttft" in t:
            row["measured_speedup"] = full["onnx_ttft"]["median"] / t["onnx_ttft"]["median"]
            row["efficiency"] = row["measured_speedup"] / row["flop_ideal_speedup"]
        if "eager_ttft" in t:
            row["eager_speedup"] = full["eager_ttft"]["median"] / t["eager_ttft"]["median"]
            row["eager_efficiency"] = row["eager_speedup"] / row["flop_ideal_speedup"]
        if "eager_ttft" in t and "onnx_ttft" in t:
            row["onnx_vs_eager_ttft"] = t["eager_ttft"]["median"] / t["onnx_ttft"]["median"]
            row["onnx_vs_eager_decode"] = t["eager_decode"]["median"] / t["onnx_decode"]["median"]
