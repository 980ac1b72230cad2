"""Open image files with one rule for every path (PyTorch and the torch-free runtime), one-line errors.

The rule: a file PIL can read, no larger than Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`,
about 89 megapixels), at most 8 bits per channel (a 16-bit or float image would be clipped to white by an
RGB conversion: it is refused, not silently changed), and not empty. Other 8-bit modes become RGB.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from duet_export.errors import DuetError

__all__ = [
    "HIGH_DEPTH_MODES",
    "check_image_file",
    "open_image",
    "open_image_bytes",
    "open_rgb_image",
    "to_rgb",
]

HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def check_image_file(path: str | os.PathLike) -> None:
    """A cheap look at the file's header only (no decoding): the rule's one-line errors before any work,
    for data sets whose images are read much later."""
    _open(path, load=False)


def open_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path`, fully read and in its own mode, or a one-line `DuetError`."""
    return _open(path, load=True)


def open_image_bytes(data: bytes, name: str = "the image") -> Image.Image:
    """An image sent as bytes (a server's upload), read under the same rule as a file; `name` says in the
    one-line error which input it was."""
    return _read(io.BytesIO(data), name, load=True)


def _open(path: str | os.PathLike, load: bool) -> Image.Image | None:
    p = Path(path)
    if not p.is_file():
        raise DuetError(f"{p}: no such image file")
    return _read(p, str(p), load)


def _read(source: Path | io.BytesIO, p: str, load: bool) -> Image.Image | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                if im.mode in HIGH_DEPTH_MODES:
                    to_rgb(im, p)
                if not load:
                    return None
                im.load()
                return im.copy()
    except DuetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DuetError(
            f"{p} has more pixels than Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} (a decompression bomb "
            "guard): resize it first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise DuetError(f"{p} is not an image PIL can read") from None


def to_rgb(image: Image.Image, name: str = "the image") -> Image.Image:
    """`image` as 8-bit RGB, or a one-line `DuetError` for what a conversion would silently ruin."""
    if image.mode in HIGH_DEPTH_MODES:
        raise DuetError(
            f"{name} has mode {image.mode} (more than 8 bits per channel), which is refused: the model was "
            "trained on 8-bit RGB; save the image as 8-bit RGB"
        )
    if image.width < 1 or image.height < 1:
        raise DuetError(f"{name} is empty")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_rgb_image(path: str | os.PathLike) -> Image.Image:
    """The image file at `path` as 8-bit RGB under the module's rule."""
    return to_rgb(open_image(path), str(path))
