"""The paper's accuracy table in miniature, on GridDigits-VQA, on a laptop CPU.

Trains a small LLaVA-style model from scratch (CLIP-like tower on 128x128 images, patch 8 -> N = 256
patches, an 8-layer Llama-like decoder) on GridDigits-VQA, following LLaVA's recipe: the vision tower is
pre-trained first (here, since no CLIP may be downloaded, for 3,500 steps: naming each patch of fresh grids
of randomly distorted training scans as a digit or background, and labelling each digit's patch with how
many cells of its image show that digit; `--tower distorted` without the count, `distorted-positions` with
each patch's row and column instead, `distorted-counts-positions` with both, `scans` on the training images
themselves; `--cls-saliency` also teaches the CLS attention that Stage 1 ranks patches by to fall on the
digits, as a pretrained CLIP's falls on content), then projector + LLM learn
the questions with the tower frozen (3,500 steps), then 2,000 more steps on training images that each ask
three count questions (`--count-steps`): without those the decoder answers every count of 2-4 with "1". It then
evaluates side by side at ~67 % and ~89 % visual-token reduction (the paper's 192 and 64 of 576, scaled
to N):

  full model | Stage 1 only | Stage 2 only | DUET inference-only | DUET trained with compression

"DUET trained" continues the full model's training for `--finetune-steps` more steps with compression in
the forward pass. Writes table.md, accuracy.png, results.json and every setting's answers
(answers/<setting>.jsonl, with the expected answers) to --out.

`--video` runs the same recipe on clips (a tiny Video-LLaVA, 4 frames of 2x2 grids at 64 px, N = 4 x 64 =
256 patches) at the paper's video reductions, ~53 % and ~93 % (960 and 136 of 2048), with the tower
pre-trained on the training frames (`--tower scans`), which measured better there, 5,000 decoder steps and no
count steps, and with `--cls-saliency` (full model 64.5 % against 57.5 % without; for images it cost
94.0 -> 85.0 %, so it is off there).

    .venv/bin/python benchmarks/accuracy_table.py --out results/accuracy          # ~46 min on 2 cores
    .venv/bin/python benchmarks/accuracy_table.py --out results/video --video
    .venv/bin/python benchmarks/accuracy_table.py --out /tmp/acc --quick          # smoke test, < 1 min
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from duet_export.config import DuetConfig
from duet_export.data.griddigits import GridSpec, box_patches, build_griddigits
from duet_export.data.records import read_llava_json, read_questions, write_answers
from duet_export.evaluation import evaluate
from duet_export.inputs import prepare_inputs
from duet_export.loading import load, load_image, load_visual
from duet_export.prompts import image_pixels
from duet_export.stages.budget import report, resolve_budget
from duet_export.tiny import TinyLlavaSpec, build_tiny_llava, build_tiny_video_llava
from duet_export.training import TrainSettings, parse_parts, train

MODEL = TinyLlavaSpec(
    image_size=128,
    patch_size=8,
    vision_hidden=64,
    vision_layers=2,
    vision_heads=4,
    text_hidden=128,
    text_layers=8,
    text_heads=4,
    text_kv_heads=2,
    intermediate=256,
    # ~1/sqrt(width): at 0.02 (right for 4096-wide models) this small model's attention starts so flat
    # that it cannot even memorise 64 images, and training sits at the blind answer prior.
    init_range=0.1,
    feature_layer=-1,
)
# 4x4 cells of 32 px, each digit scan at its native 8x8 on the 8-px patch grid: 256 patches, most of them
# background, so a large reduction is a real squeeze only if the digits' tokens survive. Each digit sits at
# the same spot of its cell (`--jitter` puts it anywhere on the cell's 4x4 patches): with jitter this
# decoder, trained from scratch for 5,000 steps, learned which digits an image holds (100 % on training
# images) but not where (reading a row: 15 %), since the visual tokens reach it in one raster sequence.
DATA = dict(rows=4, cols=4, cell=32, digit=8, align=8)
REDUCTIONS = (2 / 3, 8 / 9)  # the paper's 192/576 and 64/576
COUNT_QUESTIONS = 3  # per training image in --count-steps' data
SALIENCY_SLACK = 0.1  # nats over the least cross-entropy at which --cls-saliency stops pulling
VISION_AUGMENTED_COPIES = 20  # distorted copies of each training scan for the tower's pre-training
TOWER_PRETRAINING = (
    "distorted",
    "distorted-positions",
    "distorted-counts",
    "distorted-counts-positions",
    "scans",
)

# Video: 4 frames of 2x2 cells (64 px, 64 patches each), the same tower and decoder sizes.
VIDEO_FRAMES = 4
VIDEO_MODEL = replace(MODEL, image_size=64)
VIDEO_DATA = dict(rows=2, cols=2, cell=32, digit=8, align=8, frames=VIDEO_FRAMES)
VIDEO_REDUCTIONS = (1 - 960 / 2048, 1 - 136 / 2048)  # the paper's Video-LLaVA settings


def _box_targets(box_lists: list[list], grid: int, patch: int, fill: int, value) -> torch.Tensor:
    """[images, grid * grid]: `value(box, labels)` on every patch a digit box `[y, x, size, label]` touches
    (`labels`: all the image's digit labels), `fill` elsewhere."""
    target = torch.full((len(box_lists), grid * grid), fill, dtype=torch.long)
    for i, boxes in enumerate(box_lists):
        labels = [box[3] for box in boxes]
        for box in boxes:
            target[i, box_patches(box, grid, patch)] = value(box, labels)
    return target


def _patch_targets(box_lists: list[list], grid: int, patch: int) -> torch.Tensor:
    """Patch labels for the tower's pre-training: the digit (0-9) of every patch a digit box touches, 10
    (background) elsewhere."""
    return _box_targets(box_lists, grid, patch, 10, lambda box, labels: box[3])


def _digit_tallies(box_lists: list[list], grid: int, patch: int) -> torch.Tensor:
    """For the tower's counting objective: on every patch a digit box touches, how many boxes of the image
    show that digit; -100 (ignored) elsewhere."""
    return _box_targets(box_lists, grid, patch, -100, lambda box, labels: labels.count(box[3]))


def _tower_outputs(adapter, pixels: torch.Tensor, saliency: bool = False):
    """The feature layer's output for every patch (CLS dropped: what the patch labels are about) and, with
    `saliency`, the CLS attention over the patches that Stage 1 ranks them by (`adapter.vision_layer`'s
    scores, mean over heads), here with gradients; else None."""
    out = adapter.vision_layer(pixels, need_scores=saliency, score_grad=saliency)
    features = out.hidden[:, 1:]  # CLS dropped, as labelled
    if not saliency:
        return features, None
    heads = adapter.tower.encoder.layers[adapter.feature_layer_index].self_attn.num_heads
    return features, out.cls_attention / heads


def _saliency_loss(
    attention: torch.Tensor, target: torch.Tensor, slack: float = SALIENCY_SLACK, log: bool = False
) -> torch.Tensor:
    """How far the CLS attention over patches [B, N] is from an even share on each digit patch (`target` !=
    10): its cross-entropy against that share, above the least possible (log of the digit patches' number)
    plus `slack` nats, so that it stops pulling once ~90 % of the attention is on the digits and leaves the
    tower's capacity to its other labels (pulling all the way cost the counting label ~25 points). A
    pretrained CLIP's CLS attends to an image's content, which is what Stage 1 keeps; this tower learns it
    here because nothing can be downloaded. Images without digits add 0. `log` prints the attention's share
    on the digits."""
    digits = (target != 10).float()
    if log:
        print(f"  CLS attention on digit patches {float((attention.detach() * digits).sum(-1).mean()):.3f}")
    n = digits.sum(-1)
    share = digits / n.unsqueeze(-1).clamp(min=1)
    excess = -(share * attention.clamp(min=1e-9).log()).sum(-1) - n.clamp(min=1).log()
    return torch.relu(excess - slack).mean()


def _log_due(step: int, steps: int) -> bool:
    """Five log lines over a pre-training run, and the last step."""
    return step % max(1, steps // 5) == 0 or step == steps - 1


def _log_vision_step(
    step: int, steps: int, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor
) -> float:
    """Digit-patch accuracy of this batch, printed five times over the run; returned."""
    digits = target != 10
    accuracy = float((logits.argmax(-1)[digits] == target[digits]).float().mean())
    if _log_due(step, steps):
        print(
            f"vision pre-training step {step + 1}/{steps}: loss {loss.item():.3f}, digit-patch accuracy {accuracy:.3f}"
        )
    return accuracy


def pretrain_vision(
    model_dir: Path, data: Path, steps: int, batch: int, seed: int, saliency: bool = False
) -> float:
    """Stage 0 of the LLaVA recipe, done here instead of downloading CLIP: teach the vision tower to tell
    the digits apart, by classifying every patch (digit 0-9 or background) from the feature layer's output,
    on the training images only (their layout says where each digit is). Returns the last batch accuracy.
    """
    import random

    loaded = load(model_dir)
    adapter, tower = loaded.adapter, loaded.adapter.tower
    patch, grid = adapter.patch_size, adapter.image_size // adapter.patch_size
    head = torch.nn.Linear(tower.config.hidden_size, 11)
    rows = [json.loads(line) for line in (data / "train_layout.jsonl").read_text().splitlines() if line]
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    rng = random.Random(seed)
    tower.train()
    accuracy = 0.0
    for step in range(steps):
        chunk = rng.sample(rows, batch)
        images = [load_image(data / r["image"]) for r in chunk]
        pixels = torch.from_numpy(image_pixels(loaded.processor.image_processor, images))
        target = _patch_targets([r["digits"] for r in chunk], grid, patch)
        hidden, attention = _tower_outputs(adapter, pixels, saliency)
        logits = head(hidden)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), target.reshape(-1))
        if saliency:
            loss = loss + _saliency_loss(attention, target, log=_log_due(step, steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        accuracy = _log_vision_step(step, steps, loss, logits, target)
    tower.eval()
    loaded.model.save_pretrained(model_dir)
    return accuracy


def pretrain_vision_distorted(
    model_dir: Path,
    data: Path,
    steps: int,
    batch: int,
    seed: int,
    positions: bool = True,
    counts: bool = False,
    saliency: bool = False,
) -> float:
    """Stage 0 of the LLaVA recipe, done here instead of downloading CLIP: teach the vision tower to tell
    the digits apart, by classifying every patch (digit 0-9 or background) from the feature layer's output.
    Each batch is freshly drawn grids of the training split's scans, each scan randomly distorted
    (`augment_scans`): on the ~900 scans as they are the tower memorised them (a linear probe of its
    features read unseen digits 95 % right, below the 96.6 % of logistic regression on raw pixels).
    Returns the last batch's digit-patch accuracy.
    """
    import numpy as np

    from duet_export.data.griddigits import augment_scans, digit_scans, render_grid

    loaded = load(model_dir)
    adapter, tower = loaded.adapter, loaded.adapter.tower
    patch, grid = adapter.patch_size, adapter.image_size // adapter.patch_size
    spec = replace(GridSpec(**json.loads((data / "spec.json").read_text())["spec"]), frames=1)
    rng = np.random.default_rng(seed)
    scans, labels = digit_scans(spec, "train")
    scans = np.concatenate([scans] + [augment_scans(scans, rng) for _ in range(VISION_AUGMENTED_COPIES)])
    labels = np.tile(labels, VISION_AUGMENTED_COPIES + 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Trainer picks the GPU too
    tower.to(device)
    head = torch.nn.Linear(tower.config.hidden_size, 11).to(device)
    where = torch.nn.Linear(tower.config.hidden_size, 2 * grid).to(device)  # each patch's row and column
    cells = spec.rows * spec.cols
    how_many = torch.nn.Linear(tower.config.hidden_size, cells + 1).to(device)  # cells showing its digit
    params = [*tower.parameters(), *head.parameters()]
    params += [*(where.parameters() if positions else ()), *(how_many.parameters() if counts else ())]
    patch_rows = (torch.arange(grid * grid, device=device) // grid).repeat(batch)
    patch_cols = (torch.arange(grid * grid, device=device) % grid).repeat(batch)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    # most patches are background: weigh them down, or the digits are learnt last
    weight = torch.tensor([1.0] * 10 + [0.1], device=device)
    tower.train()
    accuracy = 0.0
    shape = (spec.rows, spec.cols)
    for step in range(steps):
        images, box_lists = [], []
        for _ in range(batch):
            picks = np.where(rng.random(shape) < spec.empty, -1, rng.integers(len(scans), size=shape))
            image, boxes = render_grid(spec, scans, picks, rng, labels[np.maximum(picks, 0)])
            images.append(image)
            box_lists.append(boxes)
        pixels = torch.from_numpy(image_pixels(loaded.processor.image_processor, images)).to(device)
        target = _patch_targets(box_lists, grid, patch).to(device)
        hidden, attention = _tower_outputs(adapter, pixels, saliency)
        logits = head(hidden)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), weight=weight)
        if positions:
            place = where(hidden).reshape(-1, 2 * grid)
            loss = loss + 0.5 * (
                torch.nn.functional.cross_entropy(place[:, :grid], patch_rows)
                + torch.nn.functional.cross_entropy(place[:, grid:], patch_cols)
            )
        if saliency:
            loss = loss + _saliency_loss(attention, target, log=_log_due(step, steps))
        if counts:
            many = how_many(hidden)
            tally = _digit_tallies(box_lists, grid, patch).to(device)
            loss = loss + 0.5 * torch.nn.functional.cross_entropy(
                many.reshape(-1, cells + 1), tally.reshape(-1)
            )
            if _log_due(step, steps):
                on = tally != -100
                print(
                    f"  count-of-its-digit accuracy {float((many.argmax(-1)[on] == tally[on]).float().mean()):.3f}"
                )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        accuracy = _log_vision_step(step, steps, loss, logits, target)
    tower.eval().to("cpu")
    loaded.model.save_pretrained(model_dir)
    return accuracy


def balance_init(model_dir: Path, data: Path) -> dict[str, float]:
    """Put token identity, layer updates and visual tokens on one scale before training (after the tower's
    pre-training). With one init std for everything (HF's default) a 128-wide model starts with text
    embeddings of norm ~1 under layer outputs of norm ~13, and the pre-trained tower's features arrive ~20x
    larger still: the question's few tokens then move the answer by ~1 %, and the model learned to read the
    grid but answered every question alike. So: text embeddings at unit RMS per entry (the scale every
    RMS-normed layer input has), the residual projections (o_proj, down_proj) scaled by 1/sqrt(2L) as
    GPT-2 does, and the projector's output layer scaled so visual tokens enter at the text embeddings' norm.
    Returns the factors applied."""
    loaded = load(model_dir)
    adapter = loaded.adapter
    lm = loaded.model.model.language_model
    layout = json.loads((data / "train_layout.jsonl").read_text().splitlines()[0])
    frame = data / layout["image"]  # a video model takes the frame's whole clip (its folder)
    visual = load_visual(frame.parent if adapter.media == "video" else frame, adapter)
    inputs = prepare_inputs(loaded.processor, adapter, [visual], ["Which digits are in the image?"])
    pixels = inputs.get("pixel_values", inputs.get("pixel_values_videos"))
    with torch.no_grad():
        embed = lm.embed_tokens.weight
        factors = {"embeddings": float(1.0 / embed.pow(2).mean().sqrt())}
        embed.mul_(factors["embeddings"])
        factors["residual"] = 1.0 / math.sqrt(2 * len(lm.layers))
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.mul_(factors["residual"])
            layer.mlp.down_proj.weight.mul_(factors["residual"])
        out = adapter.vision_layer(pixels.flatten(0, pixels.dim() - 4), need_scores=False)
        visual_norm = adapter.project(adapter.uncompressed_tokens(out.hidden)).norm(dim=-1).mean()
        text_norm = adapter.embed(inputs["input_ids"]).norm(dim=-1).mean()
        factors["projector"] = float(text_norm / visual_norm)
        last = loaded.model.model.multi_modal_projector.linear_2
        last.weight.mul_(factors["projector"])
        last.bias.mul_(factors["projector"])
    loaded.model.save_pretrained(model_dir)
    print("balanced initialisation: " + ", ".join(f"{k} x{v:.4f}" for k, v in factors.items()))
    return factors


def stage1_only(duet: DuetConfig, budget: int) -> DuetConfig:
    """V2V alone down to `budget` tokens per image (or frame), with DUET's dominant/contextual split."""
    share = duet.contextual / (duet.dominant + duet.contextual)
    contextual = round(budget * share)
    return DuetConfig(dominant=budget - contextual, contextual=contextual, cluster_width=duet.cluster_width)


def stage2_only(geometry, budget: float) -> DuetConfig:
    """T2V alone (all N patches enter): one drop before layer 1, keeping what meets the budget."""
    n, layers = geometry.total_patches, geometry.num_layers
    ratio = max(0.0, (budget * layers / n - 1) / (layers - 1))
    return DuetConfig(drop_layers=(1,), keep_ratios=(round(ratio, 4),))


def count_training(
    out: Path, data: Path, full_dir: Path, settings: TrainSettings, steps: int
) -> tuple[list, Path]:
    """Continue the full model on training data whose images each ask `COUNT_QUESTIONS` count questions
    (the later ones about digits the image shows), for `steps` steps at the same learning rate: trained on
    the table's data alone the decoder answers every count of 2-4 with "1" (README item 6); with the
    counting tower (`--tower distorted-counts`) these steps teach it to count. Returns the new training
    examples (the fine-tunes with compression use them too) and the model's directory."""
    spec = GridSpec(**json.loads((data / "spec.json").read_text())["spec"])
    counts_data = out / "data-counts"
    if not (counts_data / "spec.json").is_file():
        build_griddigits(counts_data, replace(spec, train_counts=COUNT_QUESTIONS))
    if (counts_data / "test.jsonl").read_bytes() != (data / "test.jsonl").read_bytes():
        raise SystemExit(
            f"error: {counts_data}/test.jsonl differs from {data}/test.jsonl (remove {counts_data})"
        )
    examples = read_llava_json(counts_data / "train.json")
    counted = out / "full-counts"
    shutil.rmtree(counted, ignore_errors=True)  # this run's own output: trained again every run
    tune = replace(settings, steps=steps, warmup_steps=min(20, steps // 5), log_steps=max(1, steps // 10))
    train(load(full_dir), examples, counted, None, tune)
    return examples, counted


def recorded_args(args: argparse.Namespace) -> dict:
    """The run's arguments as results.json records them (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def trained_full_model(
    out: Path, args: argparse.Namespace, model_spec: TinyLlavaSpec, defaults: dict
) -> float | None:
    """The median training step (s) of the full model an earlier run left in `out` with the same arguments
    and model (a `--only-full` run, say), so that this run evaluates it instead of training it again; None
    when there is none. An argument the earlier run did not have yet counts as its default (`defaults`)."""
    try:
        earlier = json.loads((out / "results.json").read_text())
        # the full model is the same whatever comes after it (rows, steps on count questions, fine-tunes) and
        # wherever the folder is now (copied, say, to try other count steps beside the first run's results)
        not_shaping = ("out", "only_full", "count_steps", "finetune_steps")
        now = recorded_args(args)
        same = {k: earlier["args"].get(k, defaults.get(k)) for k in now if k not in not_shaping} == {
            k: v for k, v in now.items() if k not in not_shaping
        }
        full = earlier["rows"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    if (
        not same
        or earlier["model"] != asdict(model_spec)
        or not (out / "full" / "model.safetensors").is_file()
    ):
        return None
    return full.get("median_step_seconds")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The run's arguments with the defaults that depend on --video resolved, and the values to assume for
    an argument an earlier run's results.json lacks (for reusing its full model). Bad values exit 2."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/accuracy"))
    ap.add_argument("--quick", action="store_true", help="tiny data and few steps: checks the pipeline only")
    ap.add_argument(
        "--video", action="store_true", help="clips and a tiny Video-LLaVA, at the video reductions"
    )
    ap.add_argument(
        "--steps",
        type=int,
        help="training steps of the full model (default 3500 for images, 5000 with --video)",
    )
    ap.add_argument("--finetune-steps", type=int, default=600, help="steps of training with compression")
    ap.add_argument(
        "--vision-steps",
        type=int,
        help="steps of the tower's pre-training (default 3500 with a counting tower, distorted-counts or "
        "distorted-counts-positions; 1000 with the other distorted towers; 300 with scans)",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-images", type=int, default=6000)
    ap.add_argument("--test-images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    recipe = ap.add_argument_group("recipe search (the defaults make the published table)")
    recipe.add_argument("--learning-rate", type=float, default=5e-4)
    recipe.add_argument(
        "--train-parts", default="projector,llm", help="comma-separated: vision, projector, llm (or all)"
    )
    recipe.add_argument("--text-layers", type=int, help="decoder layers (default: the model spec's)")
    recipe.add_argument(
        "--feature-layer",
        type=int,
        help="the tower layer the projector reads (default -1, the last; LLaVA's -2 is the first of two here)",
    )
    recipe.add_argument(
        "--jitter", action="store_true", help="digits anywhere on the patch grid of their cells (harder)"
    )
    recipe.add_argument(
        "--conversations",
        action="store_true",
        help="a conversation per training image, not a record per question",
    )
    recipe.add_argument(
        "--augment-digits", action="store_true", help="training digits as random distortions of their scans"
    )
    recipe.add_argument(
        "--tower",
        choices=TOWER_PRETRAINING,
        help="the tower's pre-training: digit labels of fresh grids of distorted training scans (distorted), "
        "also each patch's row and column (distorted-positions) or how many cells show the digit of each "
        "digit patch (distorted-counts, the default for images), or of the training "
        "images (scans, the default with --video: distorted gave 53.0 %% against 57.5 %% there)",
    )
    recipe.add_argument(
        "--train-counts",
        type=int,
        default=1,
        help="count questions per training image (GridSpec.train_counts)",
    )
    recipe.add_argument(
        "--locate",
        action="store_true",
        help='training images also ask "Which cells show a 7?" (every cell of a digit shown, GridSpec.locate)',
    )
    recipe.add_argument(
        "--count-steps",
        type=int,
        help="after the full model's training, this many more steps on training data with "
        f"{COUNT_QUESTIONS} count questions per image (data-counts/); the table's full model is then that model "
        "(default 2000 for images, 0 with --video)",
    )
    recipe.add_argument(
        "--position-squeeze",
        type=float,
        default=0.0,
        help="full model (and count steps): squeeze each image's visual positions into a random 1 - S to 1 "
        "of their span (TrainSettings.position_squeeze), so that cells are not read by sequence place",
    )
    recipe.add_argument(
        "--squeeze-only-counts",
        action="store_true",
        help="--position-squeeze in the count steps only: the full model learns the questions with sequence "
        "place to help, the count steps go on without it",
    )
    recipe.add_argument(
        "--cls-saliency",
        action=argparse.BooleanOptionalAction,
        help="also train the tower's CLS attention, which Stage 1 ranks patches by, to fall evenly on "
        "the digits, as a pretrained CLIP's falls on content (README item 9; the default with --video, "
        "where the full model gained 57.5 -> 64.5 %%, not for images, where it lost 94.0 -> 85.0 %%)",
    )
    recipe.add_argument("--only-full", action="store_true", help="train and evaluate the full model only")
    args = ap.parse_args(argv)
    args.tower = args.tower or ("scans" if args.video else "distorted-counts")
    if args.steps is None:
        args.steps = 5000 if args.video else 3500
    if args.vision_steps is None:
        args.vision_steps = 300 if args.tower == "scans" else 3500 if "counts" in args.tower else 1000
    if args.cls_saliency is None:
        args.cls_saliency = args.video
    if args.count_steps is None:
        args.count_steps = 0 if args.video else 2000
    for name, value, least in (
        ("steps", args.steps, 1),
        ("finetune-steps", args.finetune_steps, 1),
        ("vision-steps", args.vision_steps, 0),
        ("count-steps", args.count_steps, 0),
    ):
        if value < least:
            ap.error(f"--{name} must be at least {least}, got {value}")
    if not 0 <= args.position_squeeze < 1:
        ap.error(f"--position-squeeze must be in [0, 1), got {args.position_squeeze}")
    if args.squeeze_only_counts and not (args.position_squeeze and args.count_steps):
        ap.error("--squeeze-only-counts needs --position-squeeze and count steps")
    layers = MODEL.vision_layers  # the video model's too
    if args.feature_layer is not None and not -layers - 1 <= args.feature_layer <= layers:
        ap.error(f"--feature-layer: the tower has {layers} layers, got {args.feature_layer}")
    if args.quick:
        args.steps, args.finetune_steps, args.train_images, args.test_images = 30, 10, 60, 8
        args.vision_steps, args.count_steps = 5, min(args.count_steps, 10)
    # runs from before --cls-saliency trained without it, whatever its default now
    return args, {**recorded_args(ap.parse_args([])), "cls_saliency": False}


def main() -> None:
    args, defaults = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model_spec, layout, reductions = (
        (VIDEO_MODEL, VIDEO_DATA, VIDEO_REDUCTIONS) if args.video else (MODEL, DATA, REDUCTIONS)
    )
    if args.text_layers:
        model_spec = replace(model_spec, text_layers=args.text_layers)
    if args.feature_layer is not None:
        model_spec = replace(model_spec, feature_layer=args.feature_layer)
    parts = parse_parts(args.train_parts)
    data = out / "data"
    if not (data / "spec.json").is_file():
        spec = GridSpec(
            **layout,
            train_images=args.train_images,
            test_images=args.test_images,
            seed=args.seed,
            jitter=args.jitter,
            conversations=args.conversations,
            augment=args.augment_digits,
            train_counts=args.train_counts,
            locate=args.locate,
        )
        build_griddigits(data, spec)
    examples = read_llava_json(data / "train.json")
    questions = read_questions(data / "test.jsonl")
    turns = sum(len(e.turns) for e in examples)
    print(
        f"GridDigits-VQA: {len(examples)} training records ({turns} questions), {len(questions)} test questions"
    )

    base = out / "base"
    if not (base / "config.json").is_file():
        if args.video:
            build_tiny_video_llava(base, model_spec, frames=VIDEO_FRAMES)
        else:
            build_tiny_llava(base, model_spec)
        if args.tower == "scans":
            pretrain_vision(base, data, args.vision_steps, 32, args.seed, saliency=args.cls_saliency)
        else:
            counts, positions = "counts" in args.tower, "positions" in args.tower
            pretrain_vision_distorted(
                base,
                data,
                args.vision_steps,
                32,
                args.seed,
                positions=positions,
                counts=counts,
                saliency=args.cls_saliency,
            )
        balance_init(base, data)
    full_dir = out / "full"
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_steps=min(100, args.steps // 10), train=parts, save_steps=10**9, seed=args.seed, log_steps=max(1, args.steps // 30),
        position_squeeze=0.0 if args.squeeze_only_counts else args.position_squeeze,
        force=True,  # a full model not reused above is this run's own output: trained again
    )  # fmt: skip
    full_step = trained_full_model(out, args, model_spec, defaults)
    if full_step is None:
        full_step = train(load(base), examples, full_dir, None, settings).median_step_seconds
    else:
        print(f"reusing the full model in {full_dir} (trained by an earlier run with these arguments)")
    if args.count_steps:
        counting = replace(settings, position_squeeze=args.position_squeeze)
        examples, full_dir = count_training(out, data, full_dir, counting, args.count_steps)
    loaded = load(full_dir)
    geometry = loaded.adapter.geometry()
    n = geometry.total_patches
    print(f"geometry: N={n} patches ({geometry.frames} frame(s)), L={geometry.num_layers} layers")

    rows = []

    def run(name: str, config: DuetConfig | None, model=None, step_seconds=None, target=None):
        result = evaluate(model or loaded, questions, config, batch_size=32)
        rep = report(config, geometry) if config is not None and config.enabled else None
        row = {
            "setting": name,
            "target_reduction": target,
            "config": config.to_dict() if config is not None else None,
            "average_tokens": rep.average_tokens if rep else float(n),
            "reduction": rep.reduction if rep else 0.0,
            "accuracy": result.accuracy,
            "by_kind": result.by_kind,
            "eval_seconds": result.seconds,
        }
        if step_seconds is not None:
            row["median_step_seconds"] = step_seconds
        rows.append(row)
        slug = "-".join(name.lower().replace("(", "").replace(")", "").split())
        suffix = f"-{round(100 * target)}" if target else ""
        write_answers(out / "answers" / f"{slug}{suffix}.jsonl", result.answers)
        print(f"{name:<28} {result.summary()}")

    run("full model", None, step_seconds=full_step, target=0.0)
    for reduction in () if args.only_full else reductions:
        budget = n * (1 - reduction)
        duet = resolve_budget(budget, geometry, rules=loaded.adapter.rules)
        per_frame = round(report(duet, geometry).average_tokens / geometry.frames)
        run("Stage 1 only (V2V)", stage1_only(duet, per_frame), target=reduction)
        run("Stage 2 only (T2V)", stage2_only(geometry, budget), target=reduction)
        run("DUET inference-only", duet, target=reduction)
        tuned_dir = out / f"duet-trained-{round(100 * reduction)}"
        shutil.rmtree(tuned_dir, ignore_errors=True)  # this run's own output, as full-counts is
        tune = TrainSettings(
            steps=args.finetune_steps, batch_size=args.batch_size, learning_rate=2e-4,
            warmup_steps=min(20, args.finetune_steps // 5), train=parts, save_steps=10**9, seed=args.seed,
            log_steps=max(1, args.finetune_steps // 10),
        )  # fmt: skip
        tuned_train = train(load(full_dir), examples, tuned_dir, duet, tune)
        run(
            "DUET trained",
            duet,
            model=load(tuned_dir),
            step_seconds=tuned_train.median_step_seconds,
            target=reduction,
        )

    summary = {
        "rows": rows,
        "args": recorded_args(args),
        "model": asdict(model_spec),
        "family": loaded.adapter.family,
        "geometry": {"num_patches": n, "frames": geometry.frames, "num_layers": geometry.num_layers},
        "cores": torch.get_num_threads(),
        "total_minutes": (time.perf_counter() - started) / 60,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    table = markdown_table(rows, full_step, args.batch_size)
    (out / "table.md").write_text(table)
    plot(rows, out / "accuracy.png")
    print(table)
    print(f"total {summary['total_minutes']:.1f} min; written {out / 'table.md'}, {out / 'accuracy.png'}")


def markdown_table(rows: list[dict], full_step: float, batch: int) -> str:
    full = rows[0]["accuracy"]
    lines = [
        "| setting | target reduction | avg visual tokens | reduction | accuracy | % of full | region | presence | count |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kinds = [f"{100 * r['by_kind'].get(k, float('nan')):.1f}" for k in ("region", "presence", "count")]
        rel = 100 * r["accuracy"] / full if full else float("nan")
        lines.append(
            f"| {r['setting']} | {100 * (r['target_reduction'] or 0):.0f} % | {r['average_tokens']:.2f} | "
            f"{100 * r['reduction']:.1f} % | {100 * r['accuracy']:.2f} % | {rel:.1f} % | "
            + " | ".join(kinds)
            + " |"
        )
    steps = [r for r in rows if "median_step_seconds" in r and r["setting"] != "full model"]
    for r in steps:
        lines.append(
            f"\nTraining step (batch {batch}, median): full {1000 * full_step:.0f} ms, with DUET at "
            f"{100 * r['target_reduction']:.0f} % reduction {1000 * r['median_step_seconds']:.0f} ms "
            f"({full_step / r['median_step_seconds']:.2f}x faster per step)"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    full = rows[0]
    ax.axhline(
        100 * full["accuracy"],
        color="gray",
        ls="--",
        lw=1,
        label=f"full model ({full['average_tokens']:.0f} tokens)",
    )
    styles = {
        "Stage 1 only (V2V)": "s",
        "Stage 2 only (T2V)": "^",
        "DUET inference-only": "o",
        "DUET trained": "*",
    }
    for name, marker in styles.items():
        pts = sorted((r["average_tokens"], 100 * r["accuracy"]) for r in rows if r["setting"] == name)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, ms=8 if marker == "*" else 6, label=name)
    ax.set_xlabel("average visual tokens per decoder layer")
    ax.set_ylabel("GridDigits-VQA test accuracy (%)")
    ax.set_title(f"Accuracy vs visual tokens (N = {round(full['average_tokens'])} patches per sample)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
