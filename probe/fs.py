"""Writing files so that a fault never costs earlier work: atomic replace, temp files removed on any failure, a
full disk (``ENOSPC``, or the many ways h5py, safetensors, FAISS and torch report it) turned into one
``DiskFullError`` naming the file, the space it needed and the space free, and a path that cannot be written (a
folder in the way, a file where a folder should be, a read-only filesystem) into one ``UnwritableError``.

Example:
    >>> with atomic_path("heads/demo.safetensors", need=2_000_000) as tmp:
    ...     save_file(arrays, str(tmp))   # tmp = heads/demo.safetensors.tmp; renamed over on success
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import takewhile
from pathlib import Path

from .errors import DiskFullError, ProbeError

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
FULL_MESSAGES = ("no space left", "disk quota exceeded", "file too large", "unexpected pos",  # torch's zip writer
                 "not enough space")
LOW_SPACE = 1 << 20  # after a failed write, less than this free on its filesystem means the disk filled up


class UnwritableError(ProbeError, OSError):
    """A file or folder that cannot be written for another reason than space: a folder where the file goes, a file
    where a folder goes, a read-only filesystem, no permission. Also an OSError with ``errno`` and ``filename``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to this user on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def human(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk: an OSError with ENOSPC / EDQUOT / EFBIG,
    a library message saying so, or — for libraries that only say "write failed" (no errno) — a filesystem under
    ``path`` with less than 1 MiB left (call this before removing the failed write's temp file)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        if any(m in str(e).lower() for m in FULL_MESSAGES):
            return True
        e = e.__cause__ or e.__context__
    if path is not None and isinstance(exc, (OSError, RuntimeError)) and getattr(exc, "errno", None) is None:
        try:  # an errno other than the full ones says what went wrong: only errno-less library errors are guessed
            return free_bytes(path) < LOW_SPACE
        except OSError:
            return False
    return False


def disk_full_error(path: str | os.PathLike, need: int | None = None, what: str = "",
                    free: int | None = None) -> DiskFullError:
    """The one-line error for a full disk while writing ``path``; ``what``: what was kept / how to resume."""
    free = free_bytes(path) if free is None else free
    needs = f"it needs about {human(need)} and " if need else ""
    err = DiskFullError(f"no space left on the device to write {str(path)!r}: {needs}{human(free)} "
                        f"{'is' if free < 1024 else 'are'} free; free some space or write elsewhere"
                        + (f" ({what})" if what else ""))
    err.errno = errno.ENOSPC
    err.filename = str(path)
    return err


def check_space(path: str | os.PathLike, need: int, what: str = "") -> None:
    """Refuse before writing ``need`` bytes at ``path`` when its filesystem has less free."""
    free = free_bytes(path)
    if free < need:
        raise disk_full_error(path, need, what, free=free)


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The regular file standing where ``folder`` or one of its parents should be a folder (the nearest of them
    that exists is no folder), or None."""
    folder = Path(folder)
    on = next((p for p in (folder, *folder.parents) if p.exists()), None)  # exists() is False under a file
    return on if on is not None and not on.is_dir() else None


def write_error(path: str | os.PathLike, e: OSError, folder: str | os.PathLike | None = None) -> ProbeError:
    """The one-line error for ``e`` while writing ``path``: DiskFullError for a full disk, else UnwritableError
    naming ``path`` and why (a file in the way of ``folder``, default ``path``'s folder, is named as such)."""
    if isinstance(e, ProbeError):
        return e
    if is_disk_full(e):
        return disk_full_error(path)
    on = file_in_the_way(Path(path).parent if folder is None else folder)
    if on is not None:
        why = "it is a file, not a folder" if on == Path(path) else f"{str(on)!r} is a file, not a folder"
    else:
        why = e.strerror or str(e)
        if e.filename is not None and str(e.filename) != str(path):
            why += f" ({str(e.filename)!r})"
    err = UnwritableError(f"cannot write {str(path)!r}: {why}")
    err.errno, err.filename = e.errno, str(path)
    return err


def make_dirs(folder: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """``mkdir -p folder``; a folder that cannot be made (a file in the way, a read-only filesystem) is one
    UnwritableError (or DiskFullError) naming ``path`` (default: ``folder``), the file it is made for."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(folder if path is None else path, e, folder=folder) from None
    return folder


@contextmanager
def new_folders(folder: str | os.PathLike, path: str | os.PathLike | None = None) -> Iterator[Path]:
    """``make_dirs(folder, path)`` for a run that may still be refused (no space, a bad option): should the body
    fail, the folders this call made are removed again while they are empty, so a refused run leaves none behind.
    A folder something was written into stays (an interrupted run's journal, to resume from)."""
    folder = Path(folder)
    made = list(takewhile(lambda p: not p.exists(), (folder, *folder.parents)))  # deepest first
    make_dirs(folder, path)
    try:
        yield folder
    except BaseException:
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not empty: written into, keep it and its parents
                break
        raise


def temp_path(path: str | os.PathLike) -> Path:
    """A new temp file's name beside ``path`` (``path.<random>.tmp``): one per write, so two writers of one path
    never write into the same temp file -- each renames its own complete file, and the last rename wins."""
    path = Path(path)
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _can_write(path: Path) -> None:
    """Refuse before writing when ``path`` cannot be a file: a folder there, its folder not makeable, or nothing
    creatable in it (read-only, no permission); the probe file (a ``temp_path``) is removed again."""
    if path.is_dir():
        err = UnwritableError(f"cannot write {str(path)!r}: it is a folder, expected a file")
        err.errno, err.filename = errno.EISDIR, str(path)
        raise err
    make_dirs(path.parent, path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb"):
            pass
        tmp.unlink()
    except OSError as e:
        raise write_error(path, e) from None


@contextmanager
def atomic_path(path: str | os.PathLike, need: int | None = None, what: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path`` (``temp_path``) to write; on success fsync it and rename it over ``path``
    (atomic: ``path`` is either the old file or the new one, never half). On any failure the temp file is removed
    and ``path`` is untouched; a full disk becomes ``DiskFullError`` (naming ``path``, ``need`` and the space
    free), a path that cannot be written ``UnwritableError`` (checked before the body runs). ``need``: bytes the
    write is expected to take, checked before writing when given."""
    with atomic_paths([path], need, what) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], need: int | None = None, what: str = "") -> Iterator[list[Path]]:
    """Several files replaced together: yield their temp paths (``temp_path`` each) to write, in the order given; on
    success each is fsynced, then all are renamed in that order -- put the file that vouches for the others last
    (a sidecar with their checksums), so an interruption between renames is caught by it. On any failure every temp
    file is removed and no path is touched; a full disk becomes ``DiskFullError`` naming the file being written
    (the last whose temp file exists), a path that cannot be written ``UnwritableError`` naming it (each is
    checked before the body runs). ``need``: bytes of all of them, checked before writing when given.

    Example:
        >>> with atomic_paths(["x.faiss.shard-0", "x.faiss", "x.faiss.json"]) as (t0, t1, t2):
        ...     ...  # write each; all three appear together
    """
    paths = [Path(p) for p in paths]
    for p in paths:
        _can_write(p)
    if need and paths:
        check_space(paths[-1], need, what)
    tmps = [temp_path(p) for p in paths]
    try:
        yield tmps
        for tmp in tmps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    except BaseException as e:
        at, at_tmp = next(((p, t) for p, t in zip(reversed(paths), reversed(tmps)) if t.exists()),
                          (paths[0], tmps[0]))
        full = is_disk_full(e, at_tmp)
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        if full:
            raise disk_full_error(at, need, what) from None
        owner = {str(x): p for p, t in zip(paths, tmps) for x in (p, t)}
        if isinstance(e, OSError) and str(e.filename) in owner:  # our own file failed after the check (a race)
            raise write_error(owner[str(e.filename)], e) from None
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, what: str = "") -> Path:
    """``path.write_bytes(data)`` atomically, with a full disk reported as ``DiskFullError``."""
    with atomic_path(path, need=len(data), what=what) as tmp:
        tmp.write_bytes(data)
    return Path(path)


NO_FIGURE_FORMATS = ("pgf",)  # matplotlib lists it, but writing it needs a LaTeX installation


def figure_format(path: str | os.PathLike) -> str:
    """The format matplotlib writes ``path`` in, from its suffix (none: png); ProbeError naming the path when
    matplotlib has no writer for that suffix. Call it before drawing, so a bad path costs nothing."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = sorted(set(FigureCanvasBase.get_supported_filetypes()) - set(NO_FIGURE_FORMATS))
    if fmt not in known:
        raise ProbeError(f"{path}: matplotlib cannot write .{fmt} figures: give a path ending in "
                         f"{', '.join('.' + k for k in known)} (or no suffix for PNG)")
    return fmt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure atomically in the format of ``path``'s suffix (``figure_format``; any previous
    file stays until the new one is complete), then close it -- also when the write fails."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        fmt = figure_format(path)
        with atomic_path(path, what="any previous one is unchanged") as tmp:
            try:
                fig.savefig(tmp, format=fmt)
            except (ProbeError, OSError):
                raise
            except Exception as e:  # noqa: BLE001 - a writer's own failure (a missing tool): one line naming the file
                raise ProbeError(f"cannot write {path} as {fmt}: {type(e).__name__}: {e}") from None
    finally:
        plt.close(fig)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
