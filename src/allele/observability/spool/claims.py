"""
Claims: live spool segments locked for replay, one reader each.

Replay: a reader claims a segment with ``flock(LOCK_EX | LOCK_NB)`` and skips it if that
fails (still being written, or claimed by another reader). The lock decides, not the pid in
the name: pids are reused. ``Claim.done()`` moves the segment to ``replayed/``;
``Claim.release(offset)`` leaves it in place and writes the offset of the first undelivered
record, in ASCII decimal, to ``<segment>.offset`` (through a rename: whole or absent).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import TYPE_CHECKING

from .._core.files import open_private, private_dir
from .frames import HEADER, decode_record, iter_frames
from .safety import refusal

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from types import TracebackType

    from typing_extensions import Self

    from .segments import Spool

__all__ = ("Claim", "acquire")


class Claim:
    """
    A live segment locked for replay; a context manager that releases it on exit.

    Attributes:
        path: the segment file.
        start: the offset where :meth:`records` starts (the saved resume offset, or 0).
        position: the offset just past the last record :meth:`records` yielded: pass it to
            :meth:`release` to stop early after delivering everything yielded so far.
    """

    def __init__(self, spool: Spool, path: Path, fd: int) -> None:
        self.path = path
        self._spool = spool
        self._fd: int | None = fd
        self._sidecar = path.with_name(path.name + ".offset")
        try:
            self.start = max(0, int(self._sidecar.read_text(encoding="ascii")))
        except (OSError, ValueError):
            self.start = 0
        self.position = self.start

    def records(self) -> Iterator[tuple[int, object]]:
        """
        Yield ``(offset, record)`` in order, from :attr:`start` on.

        A damaged stretch (truncated, CRC mismatch, undecodable) is skipped and counted in
        ``corrupt_records_skipped``; reading resumes at the next whole frame. Corrupt data
        never raises.
        """
        if self._fd is None:
            raise RuntimeError(f"claim of {self.path} is finished")
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        for offset, payload in iter_frames(data, self.start if self.start <= len(data) else 0):
            if payload is not None:
                try:
                    record = decode_record(payload)
                except (ValueError, RecursionError):
                    pass
                else:
                    self.position = offset + HEADER.size + len(payload)
                    yield offset, record
                    continue
            self._spool.note_claim(corrupt=1)

    def refusal(self) -> str | None:
        """Why this segment must not be replayed (another user's, writable by others)."""
        if self._fd is None:
            raise RuntimeError(f"claim of {self.path} is finished")
        return refusal(os.fstat(self._fd))

    def done(self) -> None:
        """Everything was delivered: move the segment to ``replayed/`` and release it."""
        if self._fd is None:
            raise RuntimeError(f"claim of {self.path} is finished")
        fd, self._fd = self._fd, None
        try:
            size = os.fstat(fd).st_size
            target = self._spool.replayed_folder / self.path.name
            private_dir(target.parent)
            os.rename(self.path, target)
            os.utime(target)  # retention counts from the replay
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._sidecar)
        finally:
            os.close(fd)
        self._spool.note_claim(replayed=1, freed=size)

    def release(self, resume_offset: int | None = None) -> None:
        """
        Keep the segment for a later replay and release it; does nothing once finished.

        Args:
            resume_offset: the offset (from :meth:`records`) of the first record not
                delivered: the next replay starts there. None keeps the previous one.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if resume_offset is not None:
                if resume_offset < 0:
                    raise ValueError(f"resume_offset must be >= 0, got {resume_offset}")
                temporary = self._sidecar.with_name(f".{self._sidecar.name}.tmp")
                out = open_private(temporary, os.O_CREAT | os.O_TRUNC | os.O_WRONLY)
                try:
                    os.write(out, b"%d\n" % resume_offset)
                finally:
                    os.close(out)
                os.replace(temporary, self._sidecar)
        finally:
            os.close(fd)

    def __del__(self) -> None:
        if self._fd is not None:  # an abandoned claim must not keep its lock
            with contextlib.suppress(Exception):
                os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def acquire(spool: Spool, path: Path) -> Claim | None:
    """Lock ``path`` if no one else holds it and it is still a live segment."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held, now = os.fstat(fd), os.stat(path)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            raise FileNotFoundError(path)  # noqa: TRY301 - replayed while we waited
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return Claim(spool, path, fd)
