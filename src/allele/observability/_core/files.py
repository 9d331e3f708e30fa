"""
Private files: what the library writes locally is readable by its owner alone.

Spool segments, resume offsets, the run map, dead letters, alert and phase chunks and
tracebacks hold the experiment's data (and error messages may hold more): files are mode
0600, and every directory level the library creates is 0700. Parents that already exist
(``/tmp``, the user's home) are left as they are. The modes are set explicitly after
creation, so a permissive ``umask`` (``0``) changes nothing, and a restrictive one (such
as ``0o277``) cannot leave a folder the library cannot write.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

__all__ = ("DIR_MODE", "FILE_MODE", "open_private", "private_dir")

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """
    Create ``path`` and each missing parent with mode 0700; return it as a :class:`Path`.

    Levels that already exist keep their mode (the library did not create them).

    Raises:
        OSError: a level could not be created (or ``path`` exists and is not a folder).
    """
    path = Path(path)
    missing: list[Path] = []
    level = path
    while not level.is_dir():
        missing.append(level)
        if level.parent == level:
            break
        level = level.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, DIR_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # created meanwhile by another thread or process: theirs to set
        os.chmod(folder, DIR_MODE)
    return path


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """
    ``os.open(path, flags, 0o600)``, then make a file this process owns exactly 0600.

    A file of another owner is opened as it is (its mode is its owner's business).
    """
    fd = os.open(path, flags, FILE_MODE)
    try:
        info = os.fstat(fd)
        if stat.S_IMODE(info.st_mode) != FILE_MODE and info.st_uid == os.geteuid():
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd
