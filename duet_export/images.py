"""Open image files for every path (PyTorch and the torch-free runtime) with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from duet_export.errors import DuetError

__all__ = ["open_image"]


def open_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path`, fully read and in its own mode, or a one-line `DuetError`."""
    p = Path(path)
    if not p.is_file():
        raise DuetError(f"{p}: no such image file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError):
        raise DuetError(f"{p} is not an image PIL can read") from None
