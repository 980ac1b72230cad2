"""Pictures of what DUET kept: one panel per stage over the image as the model saw it; for a clip, a contact
sheet with one row per frame."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from duet_export.outputs import atomic_file

__all__ = ["kept_patch_masks", "write_overlay"]


def _frame_stage1(info: dict[str, Any], frame: int) -> dict[str, Any] | None:
    s1 = info["stage1"]
    return s1[frame] if isinstance(s1, list) else s1


def kept_patch_masks(info: dict[str, Any], frame: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per panel, for one image (or one frame of a clip): (title, strong mask, weak mask) over the patch grid.

    Strong = a patch that is itself a kept token (a dominant patch or an anchor); weak = a patch merged into a
    kept contextual token.
    """
    n, (rows, cols) = info["num_patches"], info["grid"]
    clip = info.get("frames", 1) > 1
    s1 = _frame_stage1(info, frame)
    panels = []

    def masks_for(tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
        strong, weak = np.zeros(n, bool), np.zeros(n, bool)
        members = {c["anchor"]: c["members"] for c in (s1 or {}).get("contextual", [])}
        for t in tokens:
            if clip:
                where, _, t = t.partition(":")
                if where != f"f{frame}":
                    continue
            kind, _, idx = t.partition(":")
            if kind == "patch":
                strong[int(idx)] = True
            elif kind == "context":
                strong[int(idx)] = True
                weak[members[int(idx)]] = True
        return strong.reshape(rows, cols), weak.reshape(rows, cols)

    if s1 is not None:
        tokens = [f"patch:{p}" for p in s1["dominant"]] + [f"context:{c['anchor']}" for c in s1["contextual"]]
        if clip:
            tokens = [f"f{frame}:{t}" for t in tokens]
        panels.append((f"Stage 1: {s1['tokens']} tokens", *masks_for(tokens)))
    for drop in info["stage2"]:
        strong, weak = masks_for(drop["kept_tokens"])
        panels.append((f"before layer {drop['layer']}: {int(strong.sum())} kept", strong, weak))
    return panels


def write_overlay(path: str | os.PathLike, views: list[np.ndarray], info: dict[str, Any]) -> None:
    """Write a PNG: the model's view of each image or frame (one row each), then each stage with kept
    patches lit and the rest dimmed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid_rows, grid_cols = info["grid"]
    rows = [kept_patch_masks(info, f) for f in range(len(views))]
    cols = 1 + len(rows[0])
    fig, axes = plt.subplots(len(views), cols, figsize=(3 * cols, 3.0 * len(views) + 0.3), squeeze=False)
    for f, (view, panels) in enumerate(zip(views, rows, strict=True)):
        h, w = view.shape[:2]
        axes[f][0].imshow(view)
        axes[f][0].set_title("input" if len(views) == 1 else f"frame {f}", fontsize=9)
        for ax, (title, strong, weak) in zip(axes[f][1:], panels, strict=True):
            scale = np.kron(
                strong * 1.0 + weak * 0.55 + 0.2 * ~(strong | weak), np.ones((h // grid_rows, w // grid_cols))
            )
            scale = np.clip(scale, 0, 1)[..., None]
            ax.imshow((view[: scale.shape[0], : scale.shape[1]] * scale).astype(np.uint8))
            ys, xs = np.nonzero(strong)
            ax.scatter(
                (xs + 0.5) * w / grid_cols,
                (ys + 0.5) * h / grid_rows,
                s=6,
                c="#39ff14",
                marker="s",
                linewidths=0,
            )
            ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{info['prompt'][:80]}  |  average {info['average_tokens']:.1f} tokens/layer", fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
