"""GridDigits-VQA: visual questions on grids of real handwritten digits (scikit-learn's bundled set).

Each image is a `rows x cols` grid of cells; most cells hold a digit (8x8 scans scaled up), some are
empty background. Three kinds of questions, each answered with one word:

- region:   "What digit is in row 2, column 3?"          -> "7"    (needs the right region)
- presence: "Is there a 7 in the image?"                 -> "yes" / "no" (balanced, POPE style)
- count:    "How many cells show a 7?"                   -> "0".."9"

With `frames > 1` every sample is a clip of that many grids (a folder of frame PNGs, Video-LLaVA's `video`
records) and the questions ask about the clip: "What digit is in frame 2, row 1, column 2?", "Is there a 7
in the clip?", "How many frames show a 3?".

Training samples also get dense, question-dependent supervision, the part a captioning stage plays for real
VLMs: "Read row 2." (or "Read frame 2.") answered with those cells in reading order ("4 - 7 0"), "Which
digits are in the image?" answered with the sorted digits present, and an echo ("Answer with row 2, column
3." -> "2 3") that teaches carrying the question's numbers to the answer position, the first hop of every
question; with `locate`, also "Which cells show a 7?" -> "2 3 ; 4 1" (every cell of a digit shown), which
asks for a digit by what it is, as counting does. Without dense supervision a model trained from scratch
sits at the answer priors; with a question-independent transcription instead ("Read the grid.") it learns
to read but ignores the question; with a ten-count answer added ("How many cells show each digit?" -> "1 0 2 ...") it learnt that answer and
the digit list within 3,500 steps but no longer learnt to find a cell (region questions 30 %, from 92 %).
Test questions are the three kinds above.

Train and test images draw their digits from disjoint halves of the scans, so the test measures reading
digits never seen in training. Everything is seeded: the same arguments give the same files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from duet_export.errors import DuetError
from duet_export.outputs import DATASET, replace_folder

__all__ = ["GridSpec", "augment_scans", "box_patches", "build_griddigits", "digit_scans", "render_grid"]


@dataclass(frozen=True)
class GridSpec:
    rows: int = 3
    cols: int = 3
    cell: int = 32  # pixels per cell; the digit is scaled to `digit` pixels inside it
    digit: int = 24
    empty: float = 0.25  # probability that a cell is empty
    align: int = 0  # >0: digits sit on a grid of this many pixels (e.g. the model's patch size)
    jitter: bool = True  # False: every digit at the same spot of its cell (mid-cell, on the align grid)
    transcribe: bool = True  # training samples also get the dense "Read row ..." / "Which digits ..." answers
    conversations: bool = False  # a sample's training questions form one conversation (else a record each)
    augment: bool = False  # training digits are random distortions of their scans (`augment_scans`)
    train_counts: int = 1  # count questions per training sample; after the first, of digits it shows
    locate: bool = False  # training samples also get "Which cells show a 7?" -> "2 3 ; 4 1" (a digit shown)
    frames: int = 1  # >1: every sample is a clip of this many grids
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


def digit_scans(spec: GridSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The scans (8x8, ink in [0, 1]) and labels that `split` of a set built with `spec` draws from."""
    scans, targets = _scans()
    order = np.random.default_rng(spec.seed).permutation(len(scans))
    pool = order[: len(order) // 2] if split == "train" else order[len(order) // 2 :]
    return scans[pool], targets[pool]


def augment_scans(scans: np.ndarray, rng: np.random.Generator, degrees: float = 12.0) -> np.ndarray:
    """A random small affine distortion of each scan (rotation, scale, sub-pixel shift), as done for MNIST:
    the ~900 training scans alone let a tower memorise them (linear-probe accuracy 1.0 on training digits,
    0.95 on unseen ones)."""
    out = np.empty_like(scans)
    up = 4
    for i, scan in enumerate(scans):
        big = Image.fromarray((scan * 255).astype(np.uint8)).resize((8 * up, 8 * up), Image.NEAREST)
        angle = rng.uniform(-degrees, degrees)
        scale = rng.uniform(0.9, 1.1)
        shift = rng.uniform(-0.75 * up, 0.75 * up, 2)
        c = 4 * up - 0.5
        a, b = np.cos(np.radians(angle)) / scale, np.sin(np.radians(angle)) / scale
        # output -> input map of PIL's affine: rotate and scale about the centre, then shift
        coeffs = (a, b, c - a * c - b * c - shift[0], -b, a, c + b * c - a * c - shift[1])
        warped = big.transform(big.size, Image.AFFINE, coeffs, resample=Image.BILINEAR)
        out[i] = np.asarray(warped.resize((8, 8), Image.BOX), dtype=np.float32) / 255.0
    return out


def render_grid(
    spec: GridSpec,
    scans: np.ndarray,
    picks: np.ndarray,
    rng: np.random.Generator,
    labels: np.ndarray | None = None,
) -> tuple[Image.Image, list[list[int]]]:
    """Draw a grid: `picks[r, c]` is a scan index, or -1 for an empty cell (small jitter per digit, unless
    `spec.jitter` is off).

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
            if not spec.jitter:
                dy = dx = margin // 2 // max(spec.align, 1) * max(spec.align, 1)
            elif spec.align:
                dy, dx = spec.align * rng.integers(0, margin // spec.align + 1, 2)
            else:
                dy, dx = rng.integers(0, margin + 1, 2)
            y, x = r * spec.cell + dy, c * spec.cell + dx
            ink = np.asarray(glyph, dtype=np.float32) / 255.0
            canvas[y : y + spec.digit, x : x + spec.digit] *= 1.0 - 0.85 * ink
            boxes.append([int(y), int(x), spec.digit, int(labels[r, c]) if labels is not None else -1])
    return Image.fromarray(canvas.astype(np.uint8)).convert("RGB"), boxes


def box_patches(box: list[int], grid: int, patch: int) -> list[int]:
    """Raster indices of the patches (`grid` x `grid` of `patch` pixels) that a layout box `[y, x, size,
    label]` (from `<split>_layout.jsonl`) touches."""
    y, x, size = box[:3]
    return [
        py * grid + px
        for py in range(y // patch, (y + size - 1) // patch + 1)
        for px in range(x // patch, (x + size - 1) // patch + 1)
    ]


def _cells(values: np.ndarray) -> str:
    return " ".join(str(x) if x >= 0 else "-" for x in values.ravel())


def _count_question(spec: GridSpec, labels: np.ndarray, d: int) -> tuple[str, str, str]:
    if spec.frames > 1:
        return ("count", f"How many frames show a {d}?", str(int((labels == d).any(axis=(1, 2)).sum())))
    return ("count", f"How many cells show a {d}?", str(int((labels == d).sum())))


def _questions(
    spec: GridSpec, labels: np.ndarray, rng: np.random.Generator, train: bool, conversation: bool = False
) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for one sample (`labels` is [frames, rows, cols], -1 = empty): one region,
    one presence and one count question, and for training the dense answers (see the module docstring) and
    `spec.train_counts - 1` more count questions.

    `conversation`: the questions become one conversation, so no answer may give away a later one: the
    presence question avoids the region answer's digit and the count question the presence digit; the
    three come first in random order (each kind must also be learnt right after the image, as tested),
    the dense ones after them."""
    clip = spec.frames > 1
    where = "clip" if clip else "image"
    present = sorted({int(x) for x in labels.ravel() if x >= 0})
    out = []
    if train and spec.transcribe:
        if clip:
            f = int(rng.integers(spec.frames))
            out.append(("read", f"Read frame {f + 1}.", _cells(labels[f])))
        else:
            r = int(rng.integers(spec.rows))
            out.append(("read", f"Read row {r + 1}.", _cells(labels[0, r])))
        out.append(("list", f"Which digits are in the {where}?", " ".join(map(str, present)) or "-"))
        # Carry the question's numbers to the answer (no image needed): the first hop of every question,
        # which a model trained from scratch otherwise has to discover together with the second.
        if rng.random() < 0.5:
            d = int(rng.integers(10))
            out.append(("echo", f"Answer with the digit {d}.", str(d)))
        else:
            cell = [int(rng.integers(n)) + 1 for n in labels.shape[int(not clip) :]]
            names = ["frame", "row", "column"][int(not clip) :]
            words = ", ".join(f"{name} {k}" for name, k in zip(names, cell, strict=True))
            out.append(("echo", f"Answer with {words}.", " ".join(map(str, cell))))
    if train and spec.locate and present:
        d = int(rng.choice(present))
        cells = np.argwhere(labels == d)[:, int(not clip) :]  # (frame,) row, column, as the echo numbers them
        where_d = " ; ".join(" ".join(str(k + 1) for k in cell) for cell in cells)
        out.append(
            ("locate", f"Which cells show a {d}?" + (" Give frame, row and column." if clip else ""), where_d)
        )
    asked = []
    filled = np.argwhere(labels >= 0)
    if len(filled):
        f, r, c = (int(x) for x in filled[rng.integers(len(filled))])
        frame = f"frame {f + 1}, " if clip else ""
        asked.append(
            ("region", f"What digit is in {frame}row {r + 1}, column {c + 1}?", str(labels[f, r, c]))
        )
    told = {int(asked[0][2])} if asked and conversation else set()
    yes = [d for d in present if d not in told]
    absent = [d for d in range(10) if d not in present]
    want_yes = rng.random() < 0.5
    d = int(rng.choice(yes if (want_yes and yes) or not absent else absent))
    asked.append(("presence", f"Is there a {d} in the {where}?", "yes" if d in present else "no"))
    told.add(d)
    d = int(rng.choice([x for x in range(10) if x != d])) if conversation else int(rng.integers(10))
    asked.append(_count_question(spec, labels, d))
    for _ in range(spec.train_counts - 1 if train else 0):
        # more count questions for training, of digits the sample shows (a uniform digit is absent ~30 %
        # of the time, which a presence answer already teaches); in a conversation none asked before
        told.add(d)
        shown = [x for x in present if x not in told] if conversation else present
        if not shown:
            break
        d = int(rng.choice(shown))
        asked.append(_count_question(spec, labels, d))
    if conversation:
        return [asked[i] for i in rng.permutation(len(asked))] + [out[i] for i in rng.permutation(len(out))]
    return out + asked


def build_griddigits(
    out_dir: str | os.PathLike, spec: GridSpec | None = None, echo=print, *, force: bool = False
) -> dict:
    """Write images/ (or clips/<sample>/<frame>.png), train.json (LLaVA format), test.jsonl (questions with
    answers), spec.json (the spec, the splits and every file written), and <split>_layout.jsonl (each
    frame image's digit boxes and labels, for pre-training a vision tower).

    `out_dir` follows `duet_export.outputs`' rule: absent, empty, or (with `force`) an earlier dataset."""
    spec = spec or GridSpec()
    if spec.frames < 1:
        raise DuetError(f"frames must be at least 1, got {spec.frames}")
    if spec.train_counts < 1:
        raise DuetError(f"train_counts must be at least 1, got {spec.train_counts}")
    scans, targets = _scans()
    order = np.random.default_rng(spec.seed).permutation(len(scans))
    pools = {"train": order[: len(order) // 2], "test": order[len(order) // 2 :]}
    counts = {"train": spec.train_images, "test": spec.test_images}
    clip = spec.frames > 1
    key = "video" if clip else "image"
    summary: dict = {"format": DATASET.format, "spec": asdict(spec), "splits": {}}
    with replace_folder(out_dir, DATASET, force=force) as tmp:
        (tmp / ("clips" if clip else "images")).mkdir()
        for split, pool in pools.items():
            rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1])
            records, kinds, layout = [], {}, []
            shape = (spec.frames, spec.rows, spec.cols)
            for i in range(counts[split]):
                picks = rng.choice(pool, size=shape)
                picks = np.where(rng.random(shape) < spec.empty, -1, picks)
                labels = np.where(picks >= 0, targets[np.maximum(picks, 0)], -1)
                name = f"clips/{split}_{i:05d}" if clip else f"images/{split}_{i:05d}.png"
                if clip:
                    (tmp / name).mkdir()
                source = scans
                if spec.augment and split == "train":  # every training digit a fresh distortion of its scan
                    source = augment_scans(scans[picks[picks >= 0]], rng)
                    picks = np.where(picks >= 0, np.cumsum(picks >= 0).reshape(shape) - 1, -1)
                for f in range(spec.frames):
                    image, boxes = render_grid(spec, source, picks[f], rng, labels[f])
                    frame_name = f"{name}/{f:02d}.png" if clip else name
                    image.save(tmp / frame_name)
                    layout.append(json.dumps({"image": frame_name, "digits": boxes}))
                train = split == "train"
                asks = _questions(spec, labels, rng, train, conversation=spec.conversations and train)
                for k, (kind, q, a) in enumerate(asks):
                    kinds[kind] = kinds.get(kind, 0) + 1
                    records.append(
                        {"id": f"{split}-{i}-{k}", "kind": kind, key: name, "q": q, "a": a, "sample": i}
                    )
            placeholder = f"<{key}>"
            if split == "train":
                # one conversation per sample, or one record per question
                groups: dict[str, list[dict]] = {}
                for r in records:
                    groups.setdefault(f"train-{r['sample']}" if spec.conversations else r["id"], []).append(r)
                data = [
                    {
                        "id": rid,
                        key: turns[0][key],
                        "conversations": [
                            {"from": who, "value": text}
                            for k, r in enumerate(turns)
                            for who, text in (
                                ("human", f"{placeholder}\n{r['q']}" if k == 0 else r["q"]),
                                ("gpt", r["a"]),
                            )
                        ],
                    }
                    for rid, turns in groups.items()
                ]
                (tmp / "train.json").write_text(json.dumps(data))
            else:
                lines = [
                    json.dumps(
                        {
                            "question_id": r["id"],
                            key: r[key],
                            "text": r["q"],
                            "answer": r["a"],
                            "kind": r["kind"],
                        }
                    )
                    for r in records
                ]
                (tmp / "test.jsonl").write_text("\n".join(lines) + "\n")
            (tmp / f"{split}_layout.jsonl").write_text("\n".join(layout) + "\n")
            summary["splits"][split] = {"samples": counts[split], "questions": len(records), "kinds": kinds,
                                        "scans": [int(x) for x in sorted(pool)]}  # fmt: skip
            echo(
                f"{split}: {counts[split]} {'clips' if clip else 'images'}, {len(records)} questions {kinds}"
            )
        summary["files"] = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        (tmp / "spec.json").write_text(json.dumps(summary))
    return summary
