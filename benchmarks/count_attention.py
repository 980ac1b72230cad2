"""Where a GridDigits model looks when it answers a count question.

For each count question ("How many cells show a 7?") of a GridDigits-VQA test split, runs the uncompressed
model once and splits the attention of the last prompt position (where the answer is read) over the visual
tokens into three shares: the patches of the asked digit, the patches of the other digits, and background.
Prints them per decoder layer and head, averaged over questions with the same true count (3 means 3 or
more). A model that counts by attention has a head whose share on the asked digit grows with the count.

    .venv/bin/python benchmarks/count_attention.py results/accuracy/full results/accuracy/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from duet_export.data.griddigits import box_patches
from duet_export.data.records import read_questions
from duet_export.errors import DuetError
from duet_export.inputs import prepare_inputs
from duet_export.loading import load, load_visual


def digit_patches(boxes: list[list[int]], grid: int, patch: int) -> dict[int, list[int]]:
    """Raster indices of the patches each digit box `[y, x, size, label]` touches, by label."""
    out: dict[int, list[int]] = {}
    for box in boxes:
        out.setdefault(box[3], []).extend(box_patches(box, grid, patch))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a trained checkpoint (e.g. OUT/full of accuracy_table.py)")
    ap.add_argument("data", type=Path, help="its GridDigits-VQA folder (test.jsonl, test_layout.jsonl)")
    ap.add_argument("--limit", type=int, default=200, help="count questions to look at")
    args = ap.parse_args()
    try:
        layout_lines = (args.data / "test_layout.jsonl").read_text().splitlines()
        questions = [q for q in read_questions(args.data / "test.jsonl") if q.kind == "count"]
    except OSError as err:
        ap.error(f"{args.data} is not a GridDigits-VQA folder: {err}")
    layouts = {
        (args.data / r["image"]).resolve(): r["digits"] for r in map(json.loads, filter(None, layout_lines))
    }
    if not questions or any(q.image.resolve() not in layouts for q in questions):
        ap.error(f"{args.data}: no count questions on single images (clips are not supported)")

    try:
        loaded = load(args.model)
    except DuetError as err:
        ap.error(str(err))
    loaded.model.set_attn_implementation("eager")  # the fused kernels return no attention weights
    adapter = loaded.adapter
    config = loaded.model.config.vision_config
    grid, patch = config.image_size // config.patch_size, config.patch_size
    shares: dict[int, list[torch.Tensor]] = {}
    for q in questions[: args.limit]:
        inputs = prepare_inputs(loaded.processor, adapter, [load_visual(q.image, adapter)], [q.text])
        visual = (inputs["input_ids"][0] == adapter.image_token_id).nonzero()[:, 0]
        by_label = digit_patches(layouts[q.image.resolve()], grid, patch)
        asked = by_label.get(int(q.text.rstrip("?").split()[-1]), [])
        others = [i for label, idx in by_label.items() for i in idx if i not in asked]
        with torch.no_grad():
            attentions = loaded.model(**inputs, output_attentions=True).attentions
        last = torch.stack([a[0, :, -1, :] for a in attentions])  # [layers, heads, sequence]
        on_asked = last[:, :, visual[asked]].sum(-1)
        on_others = last[:, :, visual[others]].sum(-1)
        background = last[:, :, visual].sum(-1) - on_asked - on_others
        shares.setdefault(min(int(q.answer), 3), []).append(torch.stack([on_asked, on_others, background]))
    print("attention of the answer position: asked digit / other digits / background, per head")
    for count in sorted(shares):
        mean = torch.stack(shares[count]).mean(0)
        print(f"true count {count}{'+' if count == 3 else ''} ({len(shares[count])} questions)")
        for layer in range(mean.shape[1]):
            heads = "  ".join(
                f"{mean[0, layer, h]:.2f}/{mean[1, layer, h]:.2f}/{mean[2, layer, h]:.2f}"
                for h in range(mean.shape[2])
            )
            print(f"  layer {layer}: {heads}")


if __name__ == "__main__":
    main()
