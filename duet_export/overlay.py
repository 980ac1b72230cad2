"""Pictures of what DUET kept: one panel per stage over the image as the model saw it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from duet_export.atomic import atomic_file

__all__ = ["kept_patch_masks", "write_overlay"]


def kept_patch_masks(info: dict[str, Any]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per panel: (title, strong mask, weak mask) over the patch grid.

    Strong = a patch that is itself a kept token (a dominant patch or an anchor); weak = a patch merged into a
    kept contextual token.
    """
    n, grid = info["num_patches"], info["grid"]
    s1 = info["stage1"]
    panels = []

    def masks_for(tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
        strong, weak = np.zeros(n, bool), np.zeros(n, bool)
        members = {c["anchor"]: c["members"] for c in (s1 or {}).get("contextual", [])}
        for t in tokens:
            kind, _, idx = t.partition(":")
            if kind == "patch":
                strong[int(idx)] = True
            elif kind == "context":
                strong[int(idx)] = True
                weak[members[int(idx)]] = True
        return strong.reshape(grid, grid), weak.reshape(grid, grid)

    if s1 is not None:
        tokens = [f"patch:{p}" for p in s1["dominant"]] + [f"context:{c['anchor']}" for c in s1["contextual"]]
        panels.append((f"Stage 1: {s1['tokens']} tokens", *masks_for(tokens)))
    for drop in info["stage2"]:
        panels.append(
            (f"before layer {drop['layer']}: {len(drop['kept'])} kept", *masks_for(drop["kept_tokens"]))
        )
    return panels


def write_overlay(path: str | os.PathLike, view: np.ndarray, info: dict[str, Any]) -> None:
    """Write a PNG: the model's view of the image, then each stage with kept patches lit and the rest dimmed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = kept_patch_masks(info)
    grid = info["grid"]
    h, w = view.shape[:2]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(3 * (1 + len(panels)), 3.3), squeeze=False)
    axes = axes[0]
    axes[0].imshow(view)
    axes[0].set_title("input", fontsize=9)
    for ax, (title, strong, weak) in zip(axes[1:], panels, strict=True):
        scale = np.kron(strong * 1.0 + weak * 0.55 + 0.2 * ~(strong | weak), np.ones((h // grid, w // grid)))
        scale = np.clip(scale, 0, 1)[..., None]
        ax.imshow((view[: scale.shape[0], : scale.shape[1]] * scale).astype(np.uint8))
        ys, xs = np.nonzero(strong)
        ax.scatter((xs + 0.5) * w / grid, (ys + 0.5) * h / grid, s=6, c="#39ff14", marker="s", linewidths=0)
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{info['prompt'][:80]}  |  average {info['average_tokens']:.1f} tokens/layer", fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
