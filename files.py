"""Writing results without leaving half-written ones behind: the one atomic writer of the package.

* `atomic_output_dir`: a whole folder (a Hub folder, a data set) is built in a temporary folder beside its target and
  renamed into place; a non-empty target is refused unless `overwrite`.
* `atomic_write_bytes` / `atomic_write_text`: one file, written to a temporary name beside it and renamed; with
  `overwrite=False` an existing file is never replaced: the result goes to the first free name (`free_path`:
  `name-1.png`, `name-2.png`, ...).

Temporary folders and files are created private (mode 0700 / 0600); results get the permissions the process umask
gives a plain `mkdir` / `open` (directories `0o777 & ~umask`, files `0o666 & ~umask`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "OutputExistsError",
    "refuse_existing_output",
    "atomic_output_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "current_umask",
    "free_path",
]


class OutputExistsError(FileExistsError):
    """The output folder exists and is not empty, and `overwrite` was not given."""


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so the umask is never changed, even briefly)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path, umask: int) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes a plain mkdir / open would have given."""
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    for root, dirs, files in os.walk(path):
        os.chmod(root, dir_mode)
        for name in dirs:
            if os.path.islink(os.path.join(root, name)):
                continue
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, file_mode)


def refuse_existing_output(out: str | os.PathLike, overwrite: bool = False) -> None:
    """`OutputExistsError` for an output folder that exists and is not empty (or is a file), unless `overwrite`."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty; choose another folder or pass --overwrite.")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """
    Yield a fresh temporary folder beside `out`; on success it replaces `out` by rename, on error it is removed
    and `out` is untouched. A non-empty `out` is refused (`OutputExistsError`) unless `overwrite`.
    """
    out = Path(out).resolve()
    refuse_existing_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _apply_umask(tmp, current_umask())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def free_path(path: str | os.PathLike) -> Path:
    """`path` if nothing is there, else the first free `stem-1.suffix`, `stem-2.suffix`, ... beside it."""
    path = Path(path)
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    """
    Write `data` to `path` through a temporary file beside it, renamed into place (missing parent folders are
    made). `overwrite=True` replaces an existing file; `overwrite=False` never does: the data goes to
    `free_path(path)`, checked again at the rename. Returns the path written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        target = free_path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        _apply_umask(Path(tmp), current_umask())
        if overwrite:
            os.replace(tmp, target)
        else:
            target = _rename_no_replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` of `text` encoded with `encoding`."""
    return atomic_write_bytes(path, text.encode(encoding), overwrite=overwrite)


def _rename_no_replace(tmp: str, target: Path) -> Path:
    """Move `tmp` to `target`, or to the next free name if `target` was taken meanwhile; never replaces a file."""
    while True:
        try:
            os.link(tmp, target)  # fails if target exists: no window between the check and the rename
        except FileExistsError:
            target = free_path(target)
            continue
        except OSError:  # a file system without hard links: check, then rename
            if target.exists():
                target = free_path(target)
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        return target
