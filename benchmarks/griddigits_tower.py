"""The vision tower's pre-training for the accuracy table (LLaVA's pretrained-CLIP stage, done here because
nothing may be downloaded), and the initial-scale balancing that follows it.

`pretrain_vision` labels the patches of the training images themselves (the video recipe);
`pretrain_vision_distorted` labels fresh grids of randomly distorted training scans, with each digit patch's
count (`counts`, the image recipe) and optionally its row and column (`positions`); `saliency` also trains the
CLS attention Stage 1 ranks patches by to fall evenly on the digits. Used by `accuracy_table.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from duet_export.data.griddigits import GridSpec, box_patches
from duet_export.inputs import prepare_inputs
from duet_export.loading import load, load_image, load_visual
from duet_export.prompts import image_pixels

__all__ = ["balance_init", "pretrain_vision", "pretrain_vision_distorted"]

SALIENCY_SLACK = 0.1  # nats over the least cross-entropy at which the saliency loss stops pulling
VISION_AUGMENTED_COPIES = 20  # distorted copies of each training scan for the tower's pre-training


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
