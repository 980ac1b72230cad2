"""What `positions=keep` is worth: an accuracy table's rows again with kept positions, beside its compact ones.

Reads a finished `benchmarks/accuracy_table.py` run (`--from`, never written to) and re-evaluates its full
model with every compressed setting's own config and `positions=keep`: Stage 1 only, Stage 2 only and DUET
inference-only need no training. "DUET trained" needs a fine-tune with keep in the forward: with
`--finetune-steps N` (default: the run's own) the full model is fine-tuned as the table did, with keep;
`--finetune-steps 0` evaluates the run's compact-trained models with keep instead (labelled so). The
uncompressed full model is the same whatever the choice (nothing is removed), so its row is copied.

    .venv/bin/python benchmarks/positions_table.py --from /work/runs/video --out /work/runs/video-keep

Writes results.json (the run's rows with "positions": "compact", then the keep rows), table.md,
accuracy.png and answers/<setting>-keep-<reduction>.jsonl to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from duet_export.config import DuetConfig
from duet_export.data.records import read_llava_json, read_questions, write_answers
from duet_export.evaluation import evaluate
from duet_export.loading import load
from duet_export.stages.budget import report
from duet_export.training import TrainSettings, parse_parts, train

KINDS = ("region", "presence", "count")
INFERENCE = ("Stage 1 only (V2V)", "Stage 2 only (T2V)", "DUET inference-only")


def _slug(name: str) -> str:
    return "-".join(name.lower().replace("(", "").replace(")", "").split())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", type=Path, required=True, help="a finished accuracy_table --out")
    ap.add_argument("--out", type=Path, required=True, help="where the keep rows go (not --from)")
    ap.add_argument(
        "--finetune-steps",
        type=int,
        help="steps of the DUET-trained fine-tune with keep (default: the run's; 0: evaluate the run's "
        "compact-trained models with keep instead)",
    )
    ap.add_argument("--batch-size", type=int, default=32, help="evaluation batch")
    args = ap.parse_args(argv)
    if not (args.source / "results.json").is_file():
        ap.error(f"{args.source} holds no results.json: give a finished accuracy_table.py --out")
    if args.out.resolve() == args.source.resolve() or args.source.resolve() in args.out.resolve().parents:
        ap.error("--out must lie outside --from (the run is read, never written)")
    if args.finetune_steps is not None and args.finetune_steps < 0:
        ap.error(f"--finetune-steps must be 0 or more, got {args.finetune_steps}")
    return args


def full_model_dir(source: Path, run_args: dict) -> Path:
    """The model the table's compressed rows were evaluated on (after its count steps, if it had any)."""
    return source / ("full-counts" if run_args.get("count_steps") else "full")


def training_examples(source: Path, run_args: dict) -> list:
    """The data the table fine-tuned with compression on (its count data when it had count steps)."""
    data = source / ("data-counts" if run_args.get("count_steps") else "data")
    return read_llava_json(data / "train.json")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    source, out = args.source, args.out
    earlier = json.loads((source / "results.json").read_text())
    run_args = earlier["args"]
    steps = run_args.get("finetune_steps", 600) if args.finetune_steps is None else args.finetune_steps
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    questions = read_questions(source / "data" / "test.jsonl")
    full_dir = full_model_dir(source, run_args)
    loaded = load(full_dir)
    geometry = loaded.adapter.geometry()
    rows = [{**r, "positions": "compact"} for r in earlier["rows"]]

    def run(name: str, config: DuetConfig, target: float, model=None, step_seconds=None) -> None:
        result = evaluate(model or loaded, questions, config, batch_size=args.batch_size)
        rep = report(config, geometry)
        row = {
            "setting": name,
            "positions": "keep",
            "target_reduction": target,
            "config": config.to_dict(),
            "average_tokens": rep.average_tokens,
            "reduction": rep.reduction,
            "accuracy": result.accuracy,
            "by_kind": result.by_kind,
            "eval_seconds": result.seconds,
        }
        if step_seconds is not None:
            row["median_step_seconds"] = step_seconds
        rows.append(row)
        write_answers(out / "answers" / f"{_slug(name)}-keep-{round(100 * target)}.jsonl", result.answers)
        print(f"{name + ' (keep)':<40} {result.summary()}", flush=True)

    targets = sorted({r["target_reduction"] for r in earlier["rows"] if r["target_reduction"]})
    for target in targets:
        at = {r["setting"]: r for r in earlier["rows"] if r["target_reduction"] == target}
        for name in INFERENCE:
            if name in at:
                config = dataclasses.replace(DuetConfig.from_dict(at[name]["config"]), positions="keep")
                run(name, config, target)
        if "DUET trained" not in at:
            continue
        duet = dataclasses.replace(DuetConfig.from_dict(at["DUET trained"]["config"]), positions="keep")
        if steps == 0:
            model = load(source / f"duet-trained-{round(100 * target)}")
            run("DUET trained (compact), keep at inference", duet, target, model=model)
            continue
        tuned_dir = out / f"duet-trained-keep-{round(100 * target)}"
        tune = TrainSettings(
            steps=steps, batch_size=run_args["batch_size"], learning_rate=2e-4,
            warmup_steps=min(20, steps // 5), train=parse_parts(run_args["train_parts"]), save_steps=10**9,
            seed=run_args["seed"], log_steps=max(1, steps // 10), force=True,
        )  # fmt: skip
        tuned = train(load(full_dir), training_examples(source, run_args), tuned_dir, duet, tune)
        run("DUET trained", duet, target, model=load(tuned_dir), step_seconds=tuned.median_step_seconds)

    summary = {
        "rows": rows,
        "source": str(source),
        "finetune_steps": steps,
        "family": earlier.get("family"),
        "geometry": earlier.get("geometry"),
        "cores": torch.get_num_threads(),
        "total_minutes": (time.perf_counter() - started) / 60,
        "command": " ".join(["benchmarks/positions_table.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    table = markdown_table(rows)
    (out / "table.md").write_text(table)
    plot(rows, out / "accuracy.png")
    print(table)
    print(f"total {summary['total_minutes']:.1f} min; written {out / 'table.md'}, {out / 'accuracy.png'}")


def markdown_table(rows: list[dict]) -> str:
    """One line per setting and positions choice, keep right below compact at each reduction."""
    full = rows[0]["accuracy"]
    lines = [
        "| setting | positions | target reduction | avg visual tokens | accuracy | % of full | region | presence | count |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(["full model", *INFERENCE, "DUET trained"])}

    def key(r: dict) -> tuple:
        return (r["target_reduction"] or 0, order.get(r["setting"].split(" (compact)")[0], 9), r["positions"])

    for r in sorted(rows, key=key):
        kinds = [f"{100 * r['by_kind'].get(k, float('nan')):.1f}" for k in KINDS]
        rel = 100 * r["accuracy"] / full if full else float("nan")
        lines.append(
            f"| {r['setting']} | {r['positions']} | {100 * (r['target_reduction'] or 0):.0f} % | "
            f"{r['average_tokens']:.2f} | {100 * r['accuracy']:.2f} % | {rel:.1f} % | "
            + " | ".join(kinds)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against average visual tokens: compact solid, keep dashed, one colour per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=120)
    full = rows[0]
    ax.axhline(100 * full["accuracy"], color="gray", ls="--", lw=1, label="full model")
    colours = dict(zip([*INFERENCE, "DUET trained"], ["C0", "C1", "C2", "C3"], strict=True))
    for name, colour in colours.items():
        for positions, style in (("compact", "-"), ("keep", ":")):
            pts = sorted(
                (r["average_tokens"], 100 * r["accuracy"])
                for r in rows
                if r["setting"] == name and r["positions"] == positions
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), style, marker="o", color=colour, label=f"{name}, {positions}"
                )
    ax.set_xlabel("average visual tokens per decoder layer")
    ax.set_ylabel("GridDigits-VQA test accuracy (%)")
    ax.set_title("positions: compact (solid) vs keep (dotted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
