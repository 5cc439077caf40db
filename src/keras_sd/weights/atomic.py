"""Replace checkpoint files and folders atomically: readers see the old one or the new one.

A file or folder is written under a hidden temporary sibling name (`.NAME.partial-PID`)
and renamed into place once complete. A folder cannot replace another in one rename,
so the old one first moves aside (`.NAME.old-PID`), the new one takes its name, and
the old one is deleted; a failure in between puts the old one back. A process killed
outright (SIGKILL, power loss) leaves its temporary siblings behind: the next write of
the same target deletes those of processes that no longer run, and puts a folder that
was moved aside back when nothing took its place.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path


def _sibling(path: Path, kind: str, pid: int | None = None) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid() if pid is None else pid}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(path) -> list[Path]:
    """Delete what writers of `path` that no longer run left beside it; a folder one of
    them had moved aside comes back when `path` is missing. Returns what was deleted.

    Example:
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> _ = target.with_name(".model.safetensors.partial-999999999").write_bytes(b"x")
    >>> [p.name for p in clean_stale(target)]
    ['.model.safetensors.partial-999999999']
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(partial|old)-(\d+)")
    removed = []
    if not path.parent.is_dir():
        return removed
    for sibling in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(sibling.name)
        if not match or _running(int(match.group(2))):
            continue
        if match.group(1) == "old" and not os.path.lexists(path):
            os.rename(sibling, path)
            continue
        _remove(sibling)
        removed.append(sibling)
    return removed


def partial_path(path) -> Path:
    """The temporary sibling this process writes `path` under, after `clean_stale`.

    Example:
    >>> partial_path("/tmp/model.safetensors").name.startswith(".model.safetensors.partial-")
    True
    """
    path = Path(path)
    clean_stale(path)
    return _sibling(path, "partial")


def write_folder(path, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` on a new temporary folder, then put it in place of `path`
    (a folder or a file), which stays as it was if `write` or the swap fails.

    Example:
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "model"
    >>> write_folder(target, lambda folder: (folder / "config.json").write_text("{}"))
    >>> sorted(p.name for p in target.iterdir())
    ['config.json']
    """
    path = Path(path)
    partial = partial_path(path)
    _remove(partial)
    try:
        partial.mkdir(parents=True)
        write(partial)
        if not os.path.lexists(path):
            os.rename(partial, path)
            return
        old = _sibling(path, "old")
        os.rename(path, old)
        try:
            os.rename(partial, path)
        except BaseException:
            os.rename(old, path)
            raise
        _remove(old)
    finally:
        _remove(partial)


__all__ = ["clean_stale", "partial_path", "write_folder"]
