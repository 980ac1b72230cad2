"""What `positions=keep` costs at run time: compact and keep bundles of the same budgets, timed side by side.

    .venv/bin/python benchmarks/positions_speed.py --out runs/positions-speed    # llava-1.5-mini, alone

A keep bundle's prefill graph gathers each kept token's place (`stage1_kept`) and its step graph adds a
constant per layer group; nothing else differs. Every bundle is timed in one onnxruntime worker process
(the bench's, `duet_export.bench.worker`), all configurations once per round, rounds alternating between
the listed order and its reverse, so the ratios come from one run. Writes results.json to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import replace
from pathlib import Path

from duet_export.bench.artifacts import (
    bench_input,
    ensure_bundle,
    ensure_model,
    load_for_bench,
    prompt_of,
    save_input,
    text_tokens,
)
from duet_export.bench.processes import timed_in_subprocess
from duet_export.bench.settings import BenchSettings
from duet_export.bench.shapes import SHAPE_FRAMES, SHAPES
from duet_export.bench.timings import summary
from duet_export.export.bundle import ExportOptions

MODES = ("compact", "keep")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="bundles, model and results.json go here")
    image_shapes = [s for s in SHAPES if s not in SHAPE_FRAMES]
    ap.add_argument(
        "--shape", default="llava-1.5-mini", choices=image_shapes, help="a bench shape (random weights)"
    )
    ap.add_argument("--budget", type=float, action="append", help="repeatable (default: N/3 and N/9)")
    ap.add_argument("--repeats", type=int, default=21, help="measured rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    if args.repeats < 2 or args.warmup < 0 or args.decode_tokens < 1:
        ap.error("--repeats must be at least 2, --warmup 0 or more, --decode-tokens at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    settings = BenchSettings()
    loaded = load_for_bench(ensure_model(args.shape, out / "models"), settings)
    geometry = loaded.adapter.geometry()
    n = geometry.num_patches
    budgets = args.budget or [round(n / 3, 2), round(n / 9, 2)]
    visual, prompt = bench_input(loaded.adapter, loaded.adapter.image_size), prompt_of(settings.prompt_tokens)
    options = ExportOptions(
        target="cpu", max_prompt=text_tokens(loaded, visual, prompt), max_new_tokens=args.decode_tokens + 2
    ).validate(settings.dtype)
    image = save_input(visual, out / "bench-image.png")
    cases = []
    for b in budgets:
        for mode in MODES:
            config = replace(settings, positions=mode).config(b, loaded.adapter)
            bundle = ensure_bundle(loaded, config, out / "bundles" / f"budget-{b:g}-{mode}", options, print)
            cases.append(
                {"name": f"budget {b:g} {mode}", "bundle": str(bundle), "image": str(image), "prompt": prompt}
            )
    del loaded
    gc.collect()  # the worker loads the bundles; this process holds no model while it runs
    spec = {
        "backend": "onnxruntime", "label": "onnxruntime (compact and keep bundles)", "provider": "cpu",
        "thread_pool": settings.thread_pools[0], "threads": 0, "cases": cases, "warmup": args.warmup,
        "repeats": args.repeats, "decode_tokens": args.decode_tokens, "interleave": True,
    }  # fmt: skip
    timed = timed_in_subprocess(spec, print)["cases"]
    rows = []
    for b in budgets:
        stats = {
            mode: {k: summary(v) for k, v in timed[f"budget {b:g} {mode}"]["values"].items()}
            for mode in MODES
        }
        rows.append({
            "budget": b,
            **{f"{mode}_ms": {k: 1e3 * s["median"] for k, s in stats[mode].items()} for mode in MODES},
            "keep_over_compact": {k: stats["keep"][k]["median"] / s["median"] for k, s in stats["compact"].items()},
            # interquartile ranges, ms: how far apart the rounds lie
            "iqr_ms": {mode: {k: [1e3 * s["p25"], 1e3 * s["p75"]] for k, s in stats[mode].items()} for mode in MODES},
        })  # fmt: skip
    result = {"shape": args.shape, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "command": " ".join(["benchmarks/positions_speed.py", *(argv if argv is not None else sys.argv[1:])])}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print("| budget | metric | compact ms (IQR) | keep ms (IQR) | keep / compact |\n|---|---|---|---|---|")
    for row in rows:
        for key in ("vision", "prefill", "ttft", "decode"):
            iqr = {m: "-".join(f"{x:.1f}" for x in row["iqr_ms"][m][key]) for m in MODES}
            print(
                f"| {row['budget']:g} | {key} | {row['compact_ms'][key]:.1f} ({iqr['compact']}) "
                f"| {row['keep_ms'][key]:.1f} ({iqr['keep']}) | {row['keep_over_compact'][key]:.3f} |"
            )


if __name__ == "__main__":
    main()
