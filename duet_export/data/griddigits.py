"""GridDigits-VQA: visual questions on grids of real handwritten digits (scikit-learn's bundled set).

Each image is a `rows x cols` grid of cells; most cells hold a digit (8x8 scans scaled up), some are
empty background. Three kinds of questions, each answered with one word:

- region:   "What digit is in row 2, column 3?"          -> "7"    (needs the right region)
- presence: "Is there a 7 in the image?"                 -> "yes" / "no" (balanced, POPE style)
- count:    "How many cells show a 7?"                   -> "0".."9"

Training images also get "Read the grid." answered with every cell in reading order ("4 - 7 0 ..."): the
dense supervision a captioning stage gives real VLMs, without which a model trained from scratch learns
only the answer priors for a long while. Test questions are the three kinds above.

Train and test images draw their digits from disjoint halves of the scans, so the test measures reading
digits never seen in training. Everything is seeded: the same arguments give the same files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from duet_export.atomic import atomic_dir

__all__ = ["GridSpec", "build_griddigits", "render_grid"]


@dataclass(frozen=True)
class GridSpec:
    rows: int = 3
    cols: int = 3
    cell: int = 32  # pixels per cell; the digit is scaled to `digit` pixels inside it
    digit: int = 24
    empty: float = 0.25  # probability that a cell is empty
    align: int = 0  # >0: digits sit on a grid of this many pixels (e.g. the model's patch size)
    transcribe: bool = True  # training images also get "Read the grid." -> every cell in reading order
    train_images: int = 3000
    test_images: int = 300
    seed: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return self.cols * self.cell, self.rows * self.cell


def _scans():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(int)


def render_grid(
    spec: GridSpec,
    scans: np.ndarray,
    picks: np.ndarray,
    rng: np.random.Generator,
    labels: np.ndarray | None = None,
) -> tuple[Image.Image, list[list[int]]]:
    """Draw a grid: `picks[r, c]` is a scan index, or -1 for an empty cell (small jitter per digit).

    Returns the image and, per digit, its box and label `[y, x, size, label]` (label -1 without `labels`).
    """
    boxes: list[list[int]] = []
    w, h = spec.size
    canvas = np.full((h, w), 235.0, dtype=np.float32)
    margin = spec.cell - spec.digit
    for r in range(spec.rows):
        for c in range(spec.cols):
            if picks[r, c] < 0:
                continue
            glyph = Image.fromarray((scans[picks[r, c]] * 255).astype(np.uint8))
            if spec.digit != glyph.width:
                glyph = glyph.resize((spec.digit, spec.digit), Image.BILINEAR)
            if spec.align:
                dy, dx = spec.align * rng.integers(0, margin // spec.align + 1, 2)
            else:
                dy, dx = rng.integers(0, margin + 1, 2)
            y, x = r * spec.cell + dy, c * spec.cell + dx
            ink = np.asarray(glyph, dtype=np.float32) / 255.0
            canvas[y : y + spec.digit, x : x + spec.digit] *= 1.0 - 0.85 * ink
            boxes.append([int(y), int(x), spec.digit, int(labels[r, c]) if labels is not None else -1])
    return Image.fromarray(canvas.astype(np.uint8)).convert("RGB"), boxes


def _questions(
    spec: GridSpec, labels: np.ndarray, rng: np.random.Generator, transcribe: bool
) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for one grid: one region, one presence and one count question (and, for
    training, a transcription: the dense supervision that LLaVA's captioning stage gives real models)."""
    filled = [(r, c) for r in range(spec.rows) for c in range(spec.cols) if labels[r, c] >= 0]
    out = []
    if transcribe:
        cells = " ".join(str(x) if x >= 0 else "-" for x in labels.ravel())
        out.append(("transcribe", "Read the grid.", cells))
    if filled:
        r, c = filled[rng.integers(len(filled))]
        out.append(("region", f"What digit is in row {r + 1}, column {c + 1}?", str(labels[r, c])))
    present = sorted({int(x) for x in labels.ravel() if x >= 0})
    absent = [d for d in range(10) if d not in present]
    want_yes = rng.random() < 0.5
    d = int(rng.choice(present if (want_yes and present) or not absent else absent))
    out.append(("presence", f"Is there a {d} in the image?", "yes" if d in present else "no"))
    d = int(rng.integers(10))
    out.append(("count", f"How many cells show a {d}?", str(int((labels == d).sum()))))
    return out


def build_griddigits(out_dir: str | os.PathLike, spec: GridSpec | None = None, echo=print) -> dict:
    """Write images/, train.json (LLaVA format), test.jsonl (questions with answers), spec.json, and
    <split>_layout.jsonl (each digit's box and label, for pre-training a vision tower)."""
    spec = spec or GridSpec()
    scans, targets = _scans()
    order = np.random.default_rng(spec.seed).permutation(len(scans))
    pools = {"train": order[: len(order) // 2], "test": order[len(order) // 2 :]}
    counts = {"train": spec.train_images, "test": spec.test_images}
    summary: dict = {"spec": asdict(spec), "splits": {}}
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for split, pool in pools.items():
            rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1])
            records, kinds, layout = [], {}, []
            for i in range(counts[split]):
                picks = rng.choice(pool, size=(spec.rows, spec.cols))
                picks = np.where(rng.random((spec.rows, spec.cols)) < spec.empty, -1, picks)
                labels = np.where(picks >= 0, targets[np.maximum(picks, 0)], -1)
                name = f"{split}_{i:05d}.png"
                image, boxes = render_grid(spec, scans, picks, rng, labels)
                image.save(tmp / "images" / name)
                layout.append(json.dumps({"image": f"images/{name}", "digits": boxes}))
                asks = _questions(spec, labels, rng, transcribe=spec.transcribe and split == "train")
                for k, (kind, q, a) in enumerate(asks):
                    kinds[kind] = kinds.get(kind, 0) + 1
                    records.append(
                        {"id": f"{split}-{i}-{k}", "kind": kind, "image": f"images/{name}", "q": q, "a": a}
                    )
            if split == "train":
                data = [
                    {
                        "id": r["id"],
                        "image": r["image"],
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{r['q']}"},
                            {"from": "gpt", "value": r["a"]},
                        ],
                    }
                    for r in records
                ]
                (tmp / "train.json").write_text(json.dumps(data))
            else:
                lines = [
                    json.dumps(
                        {
                            "question_id": r["id"],
                            "image": r["image"],
                            "text": r["q"],
                            "answer": r["a"],
                            "kind": r["kind"],
                        }
                    )
                    for r in records
                ]
                (tmp / "test.jsonl").write_text("\n".join(lines) + "\n")
            (tmp / f"{split}_layout.jsonl").write_text("\n".join(layout) + "\n")
            summary["splits"][split] = {"images": counts[split], "questions": len(records), "kinds": kinds,
                                        "scans": [int(x) for x in sorted(pool)]}  # fmt: skip
            echo(f"{split}: {counts[split]} images, {len(records)} questions {kinds}")
        (tmp / "spec.json").write_text(json.dumps(summary))
    return summary
