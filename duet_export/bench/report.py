"""Present a benchmark result: a terminal table and a PNG chart, both from `bench.json`."""

from __future__ import annotations

from pathlib import Path

__all__ = ["format_report", "plot_report"]


def _ms(t: dict, key: str) -> str:
    s = t.get(key)
    if s is None:
        return "-"
    return f"{1000 * s['median']:.1f} ({1000 * s['p25']:.1f}-{1000 * s['p75']:.1f})"


def format_report(result: dict) -> str:
    """Markdown-style tables (readable in a terminal and pasteable into a README)."""
    rows = result["rows"]
    lines = [
        f"model: {result['model_dir']} ({result['weights']}); N={result['geometry']['num_patches']} patches, "
        f"L={result['geometry']['num_layers']} layers; provider {result['provider']}, {result['cores']} cores; "
        f"prompt {result['settings']['prompt_tokens']} text tokens; median (IQR) of {result['settings']['repeats']} "
        "interleaved rounds, ms",
        "",
        "| config | avg tokens | reduction | vision | prefill | TTFT | decode/token | tokens/s | KV bytes (prefill) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["timings"]
        tps = 1.0 / t["onnx_decode"]["median"]
        lines.append(
            f"| {r['name']} (onnxruntime) | {r['average_tokens']:.2f} | {100 * r['reduction']:.1f} % | "
            f"{_ms(t, 'onnx_vision')} | {_ms(t, 'onnx_prefill')} | {_ms(t, 'onnx_ttft')} | {_ms(t, 'onnx_decode')} | "
            f"{tps:.1f} | {r['kv_bytes_prefill'] / 2**20:.2f} MiB |"
        )
        if "eager_ttft" in t:
            lines.append(
                f"| {r['name']} (PyTorch eager) | | | {_ms(t, 'eager_vision')} | {_ms(t, 'eager_prefill')} | "
                f"{_ms(t, 'eager_ttft')} | {_ms(t, 'eager_decode')} | {1.0 / t['eager_decode']['median']:.1f} | |"
            )
    lines += [
        "",
        "| config | GFLOPs vision+prefill | FLOP-ideal speed-up | measured TTFT speed-up | efficiency | onnxruntime vs eager (TTFT / decode) | stage nodes, custom op / lowered | peak RSS onnxruntime / eager |",
        "|---|---|---|---|---|---|---|---|",
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
        lines.append(
            f"| {r['name']} | {r['flops_total'] / 1e9:.2f} | {r['flop_ideal_speedup']:.2f}x | "
            f"{r['measured_speedup']:.2f}x | {100 * r['efficiency']:.0f} % | {vs} | {share} | {mem} |"
        )
    full_kv = rows[0]["kv_bytes_prefill"]
    lines += ["", "KV cache after prefill vs full: " + ", ".join(
        f"{r['name']} {r['kv_bytes_prefill'] / full_kv:.3f} (visual tokens per group {r['group_tokens']})" for r in rows[1:]
    )]  # fmt: skip
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
    onnx = [1000 * r["timings"]["onnx_ttft"]["median"] for r in rows]
    ax.bar([i - 0.2 for i in x], onnx, 0.4, label="onnxruntime")
    if "eager_ttft" in rows[0]["timings"]:
        eager = [1000 * r["timings"]["eager_ttft"]["median"] for r in rows]
        ax.bar([i + 0.2 for i in x], eager, 0.4, label="PyTorch eager")
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("time to first token (ms)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar([i - 0.2 for i in x], [r["flop_ideal_speedup"] for r in rows], 0.4, label="FLOP-ideal")
    ax.bar([i + 0.2 for i in x], [r["measured_speedup"] for r in rows], 0.4, label="measured (onnxruntime)")
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
