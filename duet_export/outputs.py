"""Where commands write: one rule for every folder and file duet-export writes, and atomic writes.

The rule, the same for `export`, `data griddigits`, `train`, `bench` and `demo`:

1. An output folder must be absent, empty, or a folder of the same kind that duet-export wrote: its record
   (a bundle's `manifest.json`, a dataset's `spec.json`, a training run's `duet_train.json`, a bench or
   demo folder's `duet-export.json`) says so, and it holds no file that the record does not list.
   Anything else is refused with one line; a folder holding a file of the user's is never touched.
2. A result replaced whole (a bundle, a dataset) is replaced only with `force=True` (`--force`). Work
   folders are updated in place: `train` continues its run with `--resume` or starts over with `--force`;
   `bench` and `demo` reuse their own folders (cached models and bundles).
3. An output is never an input, inside one or around one, nor the current directory (or around it).
4. Everything is written into a hidden temporary sibling and renamed into place when complete, under a
   lock (`.NAME.lock` beside OUT) that refuses a second process writing the same output. Temporaries that a
   killed run left behind (`.NAME.tmp-*`, `.NAME.old-*`) are removed by the next run that takes the lock.
   New folders and files get the permissions the umask gives, as `mkdir` and `touch` would.
5. Whether the parent can be written is checked before any work (`check_output_folder`).

A single output file (`--answers`, `--overlay`, `--save-config`) named by the user is replaced if it
exists, atomically and keeping its permissions; it must not be an input or lie inside an input folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from duet_export.errors import DuetError

__all__ = [
    "BENCH",
    "BUNDLE",
    "DATASET",
    "DEMO",
    "TRAINING",
    "FolderKind",
    "atomic_dir",
    "atomic_file",
    "check_output_file",
    "check_output_folder",
    "listed_files",
    "replace_folder",
    "work_folder",
]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder duet-export writes, and how to tell one of ours: its record file and format."""

    name: str
    record: str
    format: str
    whole: bool = False  # a result replaced whole (needs --force), not a work folder updated in place
    listed: bool = True  # the record lists every file under "files"; False: the whole folder is ours
    owned_dirs: tuple[str, ...] = ()  # subfolders wholly ours even though the record does not list them

    def read_record(self, folder: Path) -> dict | None:
        """The folder's record when it is one of ours, else None."""
        try:
            record = json.loads((folder / self.record).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) and record.get("format") == self.format else None

    def foreign_files(self, folder: Path) -> list[str] | None:
        """Files in `folder` that its record does not account for; None when it holds no record of ours."""
        record = self.read_record(folder)
        if record is None:
            return None
        if not self.listed:
            return []
        known = {self.record, *listed_files(record)}
        return [
            name
            for name in _files_under(folder)
            if name not in known and not any(name.startswith(d + "/") for d in self.owned_dirs)
        ]


BUNDLE = FolderKind("bundle", "manifest.json", "duet-export-bundle", whole=True)
DATASET = FolderKind("dataset", "spec.json", "duet-export-griddigits", whole=True)
TRAINING = FolderKind("training run", "duet_train.json", "duet-export-training", owned_dirs=("checkpoints",))
BENCH = FolderKind("bench folder", "duet-export.json", "duet-export-bench", listed=False)
DEMO = FolderKind("demo folder", "duet-export.json", "duet-export-demo", listed=False)


def listed_files(record: dict) -> list[str]:
    """The file names a record's "files" lists (entries are names or {"name": ...} objects)."""
    files = record.get("files", [])
    if not isinstance(files, list):
        return []
    return [f["name"] if isinstance(f, dict) else f for f in files if isinstance(f, (dict, str))]


def _files_under(folder: Path) -> list[str]:
    """Every file (and symbolic link) below `folder`, as relative POSIX paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        out.extend((rel / name).as_posix() for name in [*filenames, *links])
    return sorted(out)


# ------------------------------------------------------------------------------------------------ checks
def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _check_inputs(out: Path, inputs: Iterable[PathLike | None], what: str) -> None:
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if out == source:
            raise DuetError(f"{what} {out} is also an input: choose another output")
        if _inside(out, source):
            raise DuetError(f"{what} {out} lies inside the input {source}: choose an output outside it")
        if _inside(source, out):
            raise DuetError(f"{what} {out} holds the input {source}: choose an output outside it")


def _check_writable(folder: Path) -> None:
    """The nearest existing ancestor of `folder` is a folder we can create entries in (tried, not guessed:
    permission bits say nothing to root or on a read-only file system)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DuetError(f"cannot write under {folder}: {existing} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".duet-export-probe-"))
    except OSError as e:
        raise DuetError(f"cannot write in {existing}: {e.strerror or e.__class__.__name__}") from None


def check_output_folder(
    path: PathLike, kind: FolderKind, *, inputs: Iterable[PathLike | None] = (), force: bool = False
) -> tuple[Path, str]:
    """Check `path` against the rule before any work; returns (absolute path, "new" | "empty" | "ours").

    `force` matters only for kinds replaced whole (bundles, datasets): without it an earlier one is refused.
    """
    given = Path(path)
    out = given.resolve()
    label = f"output folder {given}"
    if given.is_symlink():
        raise DuetError(f"{label} is a symbolic link: give the folder it points to, or a new name")
    _check_inputs(out, inputs, "output folder")
    if _inside(Path.cwd().resolve(), out):
        raise DuetError(f"{label} is (or holds) the current directory: give a new folder name")
    _check_writable(out.parent)
    if not out.exists():
        return out, "new"
    if not out.is_dir():
        raise DuetError(f"{label} exists and is not a folder")
    if not any(out.iterdir()):
        return out, "empty"
    foreign = kind.foreign_files(out)
    if foreign is None:
        raise DuetError(
            f"{label} is not empty and is not a {kind.name} written by duet-export: refusing to write "
            "there (choose a new or empty folder)"
        )
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DuetError(f"{label} holds files its {kind.name} does not list ({shown}): refusing to touch it")
    if kind.whole and not force:
        raise DuetError(f"{label} holds an earlier {kind.name}: pass --force to replace it")
    return out, "ours"


def check_output_file(path: PathLike, *, inputs: Iterable[PathLike | None] = ()) -> Path:
    """Check a user-named output file before any work: not a folder, not an input or inside one."""
    given = Path(path)
    out = given.resolve()
    if out.is_dir():
        raise DuetError(f"output file {given} is a folder")
    _check_inputs(out, inputs, "output file")
    _check_writable(out.parent)
    return out


# --------------------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, deepest last."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir()
    return list(reversed(missing))


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty


def _remove_stale(target: Path) -> None:
    """Temporaries of ours that a killed run left beside `target` (called with the lock held)."""
    stem = glob.escape(f".{target.name}")
    for pattern in (f"{stem}.tmp-*", f"{stem}.old-*"):
        for stale in target.parent.glob(pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `target` (flock, released by the kernel if we are killed); a second writer
    of the same output gets a one-line error instead of racing us."""
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DuetError(
                f"another duet-export process is writing {target}: wait for it, or choose another output"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and flock: take the new one
            break
        os.close(fd)
    try:
        _remove_stale(target)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the complete `tmp` where `target` is; the old `target` (one of ours) goes only after."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old / "x")
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: PathLike, *, check=None) -> Iterator[Path]:
    """Yield a temporary folder that becomes `target` when the block exits without an exception.

    `check()` runs under the lock just before the swap (to confirm `target` may still be replaced). With no
    `check`, an existing non-empty `target` is refused: callers that replace results use `replace_folder`.
    """
    target = Path(target).absolute()
    created = _make_parents(target.parent)
    try:
        with _locked(target):
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
            try:
                os.chmod(tmp, 0o777 & ~_umask())
                yield tmp
                if check is not None:
                    check()
                elif target.exists() and not (target.is_dir() and not any(target.iterdir())):
                    raise DuetError(f"{target} appeared while it was being written: not replacing it")
                _swap_in(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        _remove_created(created)
        raise


@contextlib.contextmanager
def replace_folder(
    target: PathLike, kind: FolderKind, *, force: bool = False, inputs: Iterable[PathLike | None] = ()
) -> Iterator[Path]:
    """`atomic_dir` for a result replaced whole (bundle, dataset), after `check_output_folder`'s rule;
    checked again under the lock just before the swap."""
    inputs = list(inputs)
    out, _ = check_output_folder(target, kind, inputs=inputs, force=force)
    with atomic_dir(out, check=lambda: check_output_folder(out, kind, inputs=inputs, force=force)) as tmp:
        yield tmp


@contextlib.contextmanager
def work_folder(
    target: PathLike, kind: FolderKind, *, inputs: Iterable[PathLike | None] = (), record: dict | None = None
) -> Iterator[tuple[Path, str]]:
    """A folder updated in place (training run, bench, demo): checked, locked, marked as ours.

    Yields (path, state) with state "new", "empty" or "ours". A folder this call created is removed again if
    the block fails on bad input (`DuetError`) or leaves nothing in it but its record.
    """
    inputs = list(inputs)
    out, _ = check_output_folder(target, kind, inputs=inputs, force=True)
    created = _make_parents(out.parent)
    try:
        with _locked(out):
            _, state = check_output_folder(out, kind, inputs=inputs, force=True)  # again, under the lock
            out.mkdir(exist_ok=True)
            if state != "ours" or record is not None:
                write_record(out, kind, record or {})
            try:
                yield out, state
            except BaseException as e:
                untouched = set(_files_under(out)) <= {kind.record}
                if state != "ours" and (isinstance(e, DuetError) or untouched):
                    shutil.rmtree(out, ignore_errors=True)
                raise
    except BaseException:
        _remove_created(created)
        raise


def write_record(folder: Path, kind: FolderKind, fields: dict) -> None:
    """Write `kind`'s record into `folder` (atomically)."""
    with atomic_file(folder / kind.record) as tmp:
        tmp.write_text(json.dumps({"format": kind.format, **fields}, indent=2))


@contextlib.contextmanager
def atomic_file(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path that replaces file `target` when the block exits without an exception; an
    existing `target` keeps its permissions, a new one gets the umask's."""
    target = Path(target).resolve()
    created = _make_parents(target.parent)
    try:
        with _locked(target):
            fd, name = tempfile.mkstemp(
                dir=target.parent, prefix=f".{target.name}.tmp-", suffix=target.suffix
            )
            os.close(fd)
            tmp = Path(name)
            try:
                mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else 0o666 & ~_umask()
                yield tmp
                os.chmod(tmp, mode)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    except BaseException:
        _remove_created(created)
        raise
