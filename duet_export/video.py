"""Read a video clip as the frames a video model takes: from a folder of frame images or a video file.

Torch-free (the onnxruntime runtime uses it). Frames are sampled uniformly as Video-LLaVA's own example
does (`np.arange(0, total, total / frames)`). Video files are decoded with PyAV, an optional extra
(`pip install 'duet-export[video]'`); a folder of frames needs nothing more than Pillow.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from duet_export.errors import DuetError
from duet_export.images import open_image, to_rgb

__all__ = ["FRAME_SUFFIXES", "open_clip", "sample_indices"]

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def sample_indices(total: int, frames: int) -> list[int]:
    """`frames` indices spread evenly over `total` frames, first frame included."""
    if total < frames:
        raise DuetError(f"the clip has {total} frames; the model takes {frames}")
    return [int(i) for i in np.arange(0, total, total / frames).astype(int)[:frames]]


def _folder_frames(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise DuetError(f"{folder} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
    return files


def _decode(path: Path, frames: int) -> list[Image.Image]:
    try:
        import av
    except ImportError:
        raise DuetError(
            f"reading {path.name} needs PyAV: pip install 'duet-export[video]' (or give a folder of frames)"
        ) from None
    try:
        # Count frames from the packets first (no decoding), then decode keeping only the sampled ones:
        # a long video never sits in memory as images.
        with av.open(str(path)) as container:
            total = sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
        wanted = set(sample_indices(total, frames))
        clip = []
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    clip.append(frame.to_image())
                if len(clip) == frames:
                    break
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise DuetError(f"{path} is not a video PyAV can read ({e.__class__.__name__})") from None
    if len(clip) != frames:
        raise DuetError(f"{path}: decoded {len(clip)} of the {frames} frames sampled from {total} packets")
    return clip


def open_clip(path: str | os.PathLike, frames: int) -> list[Image.Image]:
    """`frames` RGB frames from a folder of images (sorted by name) or a video file, or a one-line error."""
    p = Path(path)
    if p.is_dir():
        files = _folder_frames(p)
        clip = [open_image(files[i]) for i in sample_indices(len(files), frames)]
    elif p.is_file() and p.suffix.lower() in FRAME_SUFFIXES:
        raise DuetError(f"{p} is one image; a video model takes a clip: a folder of frames or a video file")
    elif p.is_file():
        clip = _decode(p, frames)
    else:
        raise DuetError(f"{p}: no such video file or folder of frames")
    sizes = {im.size for im in clip}
    if len(sizes) > 1:
        raise DuetError(f"{p}: frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})")
    return [to_rgb(im, f"{p} frame {i}") for i, im in enumerate(clip)]
