"""SHA-256 of bundle files, with a cache of files already verified.

Opening a bundle checks every file against its manifest digest. Hashing a 14 GB float16 7B bundle takes
about a minute, too long for every `run` or server start, so a file that matched once is remembered by its
real path, size, modification time (ns) and inode. Changing any byte of a file in place changes its
modification time, so it is hashed again; `check` always hashes everything. The cache is a JSON file in
`$DUET_EXPORT_CACHE` (default `$XDG_CACHE_HOME/duet-export`, else `~/.cache/duet-export`); when it cannot be
read or written, files are simply hashed every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

__all__ = ["cache_file", "file_digest", "verified_digest"]

_MAX_ENTRIES = 4096


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_file() -> Path:
    root = os.environ.get("DUET_EXPORT_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "duet-export"
    return Path(root) / "verified-digests.json"


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _read_cache(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def verified_digest(path: Path, expected: str, *, remember: bool = True) -> str | None:
    """`expected` when the file's SHA-256 is `expected`, else None. With `remember`, a file verified before
    (same real path, size, mtime and inode) is not hashed again, and a newly verified one is recorded."""
    real = str(path.resolve())
    identity = _identity(path)
    store = cache_file()
    if remember:
        cached = _read_cache(store).get(real)
        if isinstance(cached, dict) and cached.get("id") == identity and cached.get("sha256") == expected:
            return expected
    if file_digest(path) != expected:
        return None
    if remember:
        _remember(store, real, {"id": identity, "sha256": expected})
    return expected


def _remember(store: Path, key: str, entry: dict[str, str]) -> None:
    from duet_export.outputs import atomic_file

    with contextlib.suppress(Exception):  # a cache that cannot be written only costs time
        data = _read_cache(store)
        data.pop(key, None)
        data[key] = entry
        while len(data) > _MAX_ENTRIES:
            data.pop(next(iter(data)))
        store.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(store) as tmp:
            tmp.write_text(json.dumps(data))
