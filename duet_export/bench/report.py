"""Present a benchmark result: a terminal table, the targets it meets or misses, and a PNG chart."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TARGETS", "format_report", "plot_report", "targets"]

# What issue 20 asks of the bundles, as ratios read off one `bench` run.
TARGETS = {
    "ttft_vs_eager": 1.5,  # onnxruntime TTFT speed-up over PyTorch eager at equal compression (mini shapes)
    "ttft_vs_eager_real_width": 1.2,  # the same on the real-width shape
    "efficiency": 0.85,  # measured TTFT speed-up / FLOP-ideal one, at the most reduced budget (~89 %)
    "decode_vs_eager": 2.0,  # decode time per token, eager / onnxruntime
    "stage_share": 0.03,  # Stage 1 + Stage 2 nodes' share of compressed vision + prefill kernel time
}


def _ms(t: dict, key: str) -> str:
    s = t.get(key)
    if s is None:
        return "-"
    return f"{1000 * s['median']:.1f} ({1000 * s['p25']:.1f}-{1000 * s['p75']:.1f})"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _labels(result: dict) -> list[str]:
    """Backends in display order: the primary onnxruntime one, the other onnxruntime ones, eager."""
    labels = list(result.get("backends", {}))
    primary = result.get("primary")
    return sorted(labels, key=lambda x: (x != primary, x.startswith("PyTorch eager"), x))


def targets(result: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met, what was measured) for each of the issue's targets this run can speak to."""
    rows = result["rows"]
    out: list[tuple[str, bool | None, str]] = []
    need = TARGETS["ttft_vs_eager_real_width" if result.get("real_width") else "ttft_vs_eager"]
    for r in rows:
        if "onnx_vs_eager_ttft" in r:
            got = r["onnx_vs_eager_ttft"]
            out.append((f"{r['name']}: onnxruntime TTFT >= {need:g}x eager", got >= need,
                        f"{got:.2f}x against {_which(r, 'ttft')} ({_gap(got, need)})"))  # fmt: skip
    for r in rows:
        if "onnx_vs_eager_decode" in r:
            got, need_d = r["onnx_vs_eager_decode"], TARGETS["decode_vs_eager"]
            out.append((f"{r['name']}: decode per token >= {need_d:g}x eager", got >= need_d,
                        f"{got:.2f}x against {_which(r, 'decode')} ({_gap(got, need_d)})"))  # fmt: skip
    last = rows[-1]
    if len(rows) > 1 and "efficiency" in last:
        got, need_e = last["efficiency"], TARGETS["efficiency"]
        out.append((f"{last['name']} ({100 * last['reduction']:.0f} % fewer tokens): TTFT speed-up >= "
                    f"{need_e:g} x FLOP-ideal", got >= need_e,
                    f"{last['measured_speedup']:.2f}x of {last['flop_ideal_speedup']:.2f}x = {100 * got:.0f} % "
                    f"({_gap(got, need_e)})"))  # fmt: skip
    for r in rows[1:]:
        if "stage_share_custom_op" in r:
            got, need_s = r["stage_share_custom_op"]["share"], TARGETS["stage_share"]
            out.append((f"{r['name']}: stage nodes <= {100 * need_s:g} % of vision + prefill", got <= need_s,
                        f"{100 * got:.2f} % custom op, {100 * r['stage_share_lowered']['share']:.2f} % lowered"))  # fmt: skip
    return out


def _which(row: dict, key: str) -> str:
    """The eager setting a ratio was taken against (the faster one for that metric)."""
    label = row.get("eager_backend", {}).get(key, "PyTorch eager")
    return label.replace("PyTorch eager", "eager").replace("(", "").replace(")", "")


def _gap(got: float, need: float) -> str:
    return "met" if got >= need else f"missed by {100 * (1 - got / need):.0f} %"


def format_report(result: dict) -> str:
    """Markdown-style tables (readable in a terminal and pasteable into docs)."""
    rows = result["rows"]
    settings = result["settings"]
    load = result.get("load_average")
    lines = [
        f"model: {result['model_dir']} ({result['weights']}); N={result['geometry']['num_patches']} patches, "
        f"L={result['geometry']['num_layers']} layers; {settings.get('dtype', 'float32')}"
        + (
            f", bundles' linear weights {settings['weights']}"
            if settings.get("weights", "float") != "float"
            else ""
        )
        + f"; provider {result['provider']}, {result['cores']} cores"
        + (f" (load average at the end {load[0]:.1f})" if load else "")
        + f"; prompt {rows[0].get('decoder_tokens', {}).get(result.get('primary'), '?')} tokens with the full "
        f"model's image; median (IQR) of {settings['repeats']} rounds after {settings['warmup']} warm-up, ms; "
        "each backend in its own process",
        "",
        "| config | backend | vision | prefill | TTFT | decode/token | tokens/s | decoder tokens | order effect (TTFT) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = _labels(result)
    for r in rows:
        for label in labels:
            t = r.get("backends", {}).get(label)
            if t is None:
                continue
            tps = f"{1.0 / t['decode']['median']:.1f}" if "decode" in t else "-"
            order = r.get("order_effect", {}).get(label, {}).get("ttft")
            lines.append(
                f"| {r['name']} | {label} | {_ms(t, 'vision')} | {_ms(t, 'prefill')} | {_ms(t, 'ttft')} | "
                f"{_ms(t, 'decode')} | {tps} | {r.get('decoder_tokens', {}).get(label, '-')} | {_pct(order)} |"
            )
    lines += [
        "",
        "| config | reduction | KV bytes (prefill) | GFLOPs vision+prefill | FLOP-ideal speed-up | onnxruntime speed-up (efficiency) | eager speed-up (efficiency) | onnxruntime vs faster eager (TTFT / decode) | stage nodes, custom op / lowered | peak RSS onnxruntime / eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = "-"
        if "stage_share_custom_op" in r:
            share = f"{100 * r['stage_share_custom_op']['share']:.2f} % / {100 * r['stage_share_lowered']['share']:.2f} %"
        vs = (
            f"{r['onnx_vs_eager_ttft']:.2f}x / {r['onnx_vs_eager_decode']:.2f}x"
            if "onnx_vs_eager_ttft" in r
            else "-"
        )
        mem = "-"
        if r.get("peak_rss_mb_onnx") is not None:
            mem = f"{r['peak_rss_mb_onnx']:.0f} / {r.get('peak_rss_mb_eager') or float('nan'):.0f} MiB"
            if r.get("peak_rss_mb_onnx_shared") is not None:
                mem += f" (shared weights: {r['peak_rss_mb_onnx_shared']:.0f} MiB)"
        onnx = f"{r['measured_speedup']:.2f}x ({100 * r['efficiency']:.0f} %)" if "efficiency" in r else "-"
        eager = (
            f"{r['eager_speedup']:.2f}x ({100 * r['eager_efficiency']:.0f} %)"
            if "eager_efficiency" in r
            else "-"
        )
        kv = f"{r['kv_bytes_prefill'] / 2**20:.2f} MiB" if "kv_bytes_prefill" in r else "-"
        lines.append(
            f"| {r['name']} | {100 * r['reduction']:.1f} % | {kv} | {r['flops_total'] / 1e9:.2f} | "
            f"{r['flop_ideal_speedup']:.2f}x | {onnx} | {eager} | {vs} | {share} | {mem} |"
        )
    others = [x for x in labels if x != result.get("primary") and not x.startswith("PyTorch eager")]
    if others:
        lines += [
            "",
            f"Other onnxruntime variants (TTFT / decode over {result.get('primary')}'s; above 1x: slower):",
        ]
        for label in others:
            parts = []
            for r in rows:
                a, b = r["backends"].get(label), r["backends"].get(result["primary"])
                if a and b:
                    parts.append(f"{r['name']} {a['ttft']['median'] / b['ttft']['median']:.2f}x / "
                                 f"{a['decode']['median'] / b['decode']['median']:.2f}x" if "decode" in a else r["name"])  # fmt: skip
            lines.append(f"- {label}: " + ", ".join(parts))
    if any(r.get("transfers") for r in rows):
        lines += ["", "Bytes between host and device per decode step (instrumented):"]
        for r in rows:
            t = r.get("transfers", {}).get(result.get("primary"))
            if t:
                lines.append(
                    f"- {r['name']}: {t['per_step_bytes'] / 2**10:.1f} KiB with the cache in "
                    f"{'device' if t['cache'] == 'device' else 'host'} memory (as timed), "
                    f"{t['host_cache_per_step_bytes'] / 2**20:.2f} MiB with the numpy loop's host-side cache"
                )
    if len(rows) > 1 and "kv_bytes_prefill" in rows[0]:
        full_kv = rows[0]["kv_bytes_prefill"]
        lines += ["", "KV cache after prefill vs full: " + ", ".join(
            f"{r['name']} {r['kv_bytes_prefill'] / full_kv:.3f} (visual tokens per group {r['group_tokens']})" for r in rows[1:]
        )]  # fmt: skip
    checks = targets(result)
    if checks:
        lines += ["", "Targets (issue 20):", ""]
        for name, met, measured in checks:
            lines.append(f"- {'met   ' if met else 'MISSED'} {name}: {measured}")
    sweep = result.get("sweep")
    if sweep:
        lines += [
            "",
            f"Scaling (TTFT = vision + prefill, onnxruntime; compressed = {100 * sweep['reduction']:.0f} % reduction):",
            "",
            "| prompt tokens | patches | full | compressed | speed-up |",
            "|---|---|---|---|---|",
        ]
        for p in sweep["points"]:
            lines.append(
                f"| {p['prompt_tokens']} | {p['patches']} | {1000 * p['full_ttft']:.1f} ms | "
                f"{1000 * p['compressed_ttft']:.1f} ms | {p['speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot_report(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    sweep = result.get("sweep")
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(13 if sweep else 9, 3.8), dpi=110)
    names = [r["name"] for r in rows]
    x = range(len(rows))
    ax = axes[0]
    labels = _labels(result)
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        values = [
            1000 * r["backends"][label]["ttft"]["median"] if label in r["backends"] else 0 for r in rows
        ]
        ax.bar([j - 0.4 + width * (i + 0.5) for j in x], values, width, label=label)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("time to first token (ms)")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.bar([i - 0.2 for i in x], [r["flop_ideal_speedup"] for r in rows], 0.4, label="FLOP-ideal")
    ax.bar([i + 0.2 for i in x], [r.get("measured_speedup", 0) for r in rows], 0.4,
           label="measured (onnxruntime)")  # fmt: skip
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("speed-up over full")
    ax.legend(fontsize=8)
    if sweep:
        ax = axes[2]
        base = result["settings"]["prompt_tokens"]
        by_prompt = [p for p in sweep["points"] if p["patches"] == result["geometry"]["num_patches"]]
        by_size = sorted(
            [p for p in sweep["points"] if p["prompt_tokens"] == base], key=lambda p: p["patches"]
        )
        for pts, label, key in (
            (by_prompt, "prompt tokens", "prompt_tokens"),
            (by_size, "patches", "patches"),
        ):
            if len(pts) > 1:
                ax.plot(
                    [p[key] for p in pts],
                    [1000 * p["full_ttft"] for p in pts],
                    "o-",
                    label=f"full vs {label}",
                )
                ax.plot([p[key] for p in pts], [1000 * p["compressed_ttft"] for p in pts], "s--",
                        label=f"compressed vs {label}")  # fmt: skip
        ax.set_xlabel("prompt tokens / patches")
        ax.set_ylabel("TTFT (ms)")
        ax.legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(f"duet-export bench: {Path(result['model_dir']).name}, {result['provider']}, {result['cores']} cores",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
