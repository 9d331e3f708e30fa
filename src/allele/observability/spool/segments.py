"""
The disk spool: records that could not be delivered, kept on disk until a replay delivers them.

Layout of a spool directory (every folder level created is mode 0700, files are 0600,
whatever the umask: :mod:`.._core.files`)::

    <spool_dir>/
      segments/seg-<time_ns:020d>-<pid>-<seq:06d>.spool   live segments, replayed oldest first
      segments/seg-<...>.spool.offset                      where the next replay of it resumes
      replayed/seg-<...>.spool                             delivered; retention deletes them
      artifacts/<id>/<name>                                spooled artifacts' copies (.safety)
      dead-letters.jsonl, tracebacks/                      written elsewhere; retention too

A segment is a sequence of frames (:mod:`.frames`); replay claims segments (:mod:`.claims`).

Writing: each process appends to a segment of its own, named after its wall-clock creation
time (kept increasing within a process), the pid and a per-process sequence number; segments
replay in that order. A frame is written with one ``os.write`` on an ``O_APPEND`` descriptor.
A segment is created as ``.seg-<...>.spool.tmp``, locked with ``flock(LOCK_EX)`` and renamed
into place, so a visible segment is locked by its writer from birth until the writer closes
it (past ``segment_bytes``, ``close()``, ``claim()``) or dies: the kernel drops the locks of
a dead process. A forked child closes its copy of the parent's descriptor without unlocking.

What a crash can lose: after ``kill -9``, every record whose ``append`` returned is on disk
(the kernel holds it); a write cut short by the kill leaves one partial frame at the end,
which replay skips and counts as corrupt. A power loss also loses what was appended since the
last ``flush(fsync=True)``. Replay is at-least-once: a crash between delivering records and
``done()`` or ``release(offset)`` delivers them again, so the consumer must be idempotent
(MLflow ignores a re-sent metric with the same timestamp). Empty ``.tmp`` files left by a
crash during segment creation are removed by :func:`.retention.prune`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from .._core.files import open_private, private_dir
from .claims import acquire
from .frames import encode_frame, iter_frames
from .safety import folder_refusal, refusal, warn_refused

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .claims import Claim

__all__ = ("SegmentInfo", "Spool", "SpoolStatistics")

SEGMENTS, REPLAYED, TRACEBACKS = "segments", "replayed", "tracebacks"
_NAME = re.compile(r"seg-(\d{20})-(\d+)-(\d{6,})\.spool")
_RESCAN_SECONDS = 1.0


class SegmentInfo(NamedTuple):
    """
    One live segment, as listed by :meth:`Spool.segments` and :meth:`Spool.inspect`.
    """

    #: the segment file
    path: Path
    #: creation time from the name, nanoseconds since the epoch
    time_ns: int
    #: the writer's pid
    pid: int
    #: the writer's sequence number
    seq: int
    #: size in bytes
    size: int
    #: "active" (this spool's open segment), "locked" (written or claimed elsewhere),
    #: "replayable", or "refused" (another user's, or writable by others: :mod:`.safety`)
    state: Literal["active", "locked", "replayable", "refused"]
    #: whether a process with the writer's pid exists (informational only: pids are reused)
    owner_alive: bool
    #: the number of readable records when counted, else None
    records: int | None


class SpoolStatistics(NamedTuple):
    """
    A snapshot of a :class:`Spool`; the counters cover this instance in this process.
    """

    #: live segments in the directory (all processes)
    segments: int
    #: their total size in bytes
    bytes: int
    #: records appended
    records_written: int
    #: appends refused because the spool was full ("spool_full")
    dropped_full: int
    #: damaged frames skipped while reading claims (one per damaged stretch)
    corrupt_records_skipped: int
    #: claims finished with ``done()``
    replayed_segments: int


class Spool:
    """
    Append-only segment files for records that could not be delivered; see the module docs.

    Thread-safe. After ``os.fork`` the child writes to a segment of its own, and leaves the
    parent's segment (and its lock) alone.

    Args:
        directory: the spool directory; nothing is created before the first ``append``.
        max_bytes: bound on the total size of all live segments; ``append`` refuses beyond it.
            The size written by other processes is re-read at most once a second.
        segment_bytes: a segment is closed before a record would take it past this size.
    """

    def __init__(
        self, directory: Path, *, max_bytes: int = 1 << 30, segment_bytes: int = 8 << 20
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._folder = self.directory / SEGMENTS
        self._reset()
        method = weakref.WeakMethod(self._after_fork)

        def in_child() -> None:
            bound = method()
            if bound is not None:
                bound()

        os.register_at_fork(after_in_child=in_child)

    def _after_fork(self) -> None:
        """In a forked child: close (never unlock) the parent's segment and start afresh."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = self._seq = self._last_ns = 0
        self._total: int | None = None
        self._scanned_at = 0.0
        self._dir_synced = False
        self._written = self._dropped = self._corrupt = self._replayed = 0

    def append(self, record: object) -> bool:
        """
        Append one record (JSON data: tuples are read back as lists).

        Returns:
            False when the spool is full: nothing was written.

        Raises:
            TypeError: the record holds something JSON cannot encode.
            ValueError: the encoded record is larger than ``MAX_RECORD_BYTES``.
            OSError: the write failed (disk full, permissions); no part of the record remains.
        """
        frame = encode_frame(record)
        if self._pid != os.getpid():  # forked without the at-fork hook
            self._after_fork()
        with self._lock:
            if self._fd is not None and self._size + len(frame) > self.segment_bytes:
                self._close_segment()
            stale = time.monotonic() - self._scanned_at >= _RESCAN_SECONDS
            if self._total is None or (
                stale and (self._fd is None or self._total + len(frame) > self.max_bytes)
            ):
                self._total = sum(size for *_, size in _scan(self._folder, sizes=True))
                self._scanned_at = time.monotonic()
            if self._total + len(frame) > self.max_bytes:
                self._dropped += 1
                return False
            if self._fd is None:
                self._open_segment()
            self._write(frame)
            return True

    def _open_segment(self) -> None:
        private_dir(self._folder)
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        self._seq += 1
        path = self._folder / f"seg-{self._last_ns:020d}-{self._pid}-{self._seq:06d}.spool"
        temporary = path.with_name(f".{path.name}.tmp")
        fd = open_private(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(temporary, path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._fd, self._path, self._size, self._dir_synced = fd, path, 0, False

    def _write(self, frame: bytes) -> None:
        assert self._fd is not None
        assert self._total is not None
        try:
            written = os.write(self._fd, frame)
            if written != len(frame):
                raise OSError(errno.ENOSPC, f"short write to {self._path}")  # noqa: TRY301
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            self._close_segment()
            raise
        self._size += written
        self._total += written
        self._written += 1

    def _close_segment(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._path = self._fd, None, None
            os.close(fd)

    def flush(self, fsync: bool = False) -> None:
        """
        Make the appended records durable against power loss, if ``fsync`` is true.

        Nothing is buffered in the process (each ``append`` is one ``os.write``), so without
        ``fsync`` this does nothing: the records already survive ``kill -9``.
        """
        if not fsync:
            return
        with self._lock:
            if self._fd is None:
                return
            os.fsync(self._fd)
            if not self._dir_synced:
                dir_fd = os.open(self._folder, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
                self._dir_synced = True

    def close(self) -> None:
        """Close the current segment: it becomes replayable. Idempotent; appends may follow."""
        with self._lock:
            self._close_segment()

    def segments(self, *, count_records: bool = False) -> list[SegmentInfo]:
        """All live segments, oldest first; ``count_records`` reads every file."""
        return _inspect(self._folder, self._path, count_records)

    @staticmethod
    def inspect(directory: Path, *, count_records: bool = True) -> list[SegmentInfo]:
        """List the live segments of a spool directory, oldest first; creates nothing."""
        return _inspect(Path(directory) / SEGMENTS, None, count_records)

    def stats(self) -> SpoolStatistics:
        """The live segments on disk and this instance's counters."""
        sizes = [size for *_, size in _scan(self._folder, sizes=True)]
        with self._lock:
            counters = (self._written, self._dropped, self._corrupt, self._replayed)
        return SpoolStatistics(len(sizes), sum(sizes), *counters)

    def claim(self, *, own_only: bool = False) -> Iterator[Claim]:
        """
        Yield the replayable segments, oldest first, each locked for this caller alone;
        with ``own_only``, only the segments this process wrote (a forked worker leaves its
        parent's segments to the parent, which counts their events).

        The current segment of this spool is closed first, so its records are included.
        Segments locked elsewhere are skipped. A claim still unfinished when the next one is
        requested is released; otherwise the caller finishes it (``done``, ``release``, or
        leaving its ``with`` block). Nothing is yielded from a spool that belongs to another
        user or that others may write, nor such a segment (:mod:`.safety`): each is logged
        once and left in place.
        """
        self.close()
        refused = folder_refusal(self.directory, self._folder)
        if refused is not None:
            warn_refused(*refused)
            return
        for _, pid, _, path, _ in _scan(self._folder):
            if own_only and pid != self._pid:
                continue
            claim = acquire(self, path)
            if claim is None:
                continue
            reason = claim.refusal()
            if reason is not None:
                claim.release()
                warn_refused(path, reason)
                continue
            yield claim
            claim.release()

    @property
    def replayed_folder(self) -> Path:
        """Where a claim finished with ``done()`` moves its segment (``replayed/``)."""
        return self.directory / REPLAYED

    def note_claim(self, *, corrupt: int = 0, replayed: int = 0, freed: int = 0) -> None:
        """
        Count what a claim found or finished: corrupt stretches, replayed segments, bytes freed.
        """
        with self._lock:
            self._corrupt += corrupt
            self._replayed += replayed
            if self._total is not None:
                self._total = max(0, self._total - freed)


def children(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted; none if it does not exist."""
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


def _scan(folder: Path, *, sizes: bool = False) -> list[tuple[int, int, int, Path, int]]:
    """The live segments as ``(time_ns, pid, seq, path, size or -1)``, oldest first."""
    found = []
    for path in children(folder):
        match = _NAME.fullmatch(path.name)
        if match is not None:
            try:
                size = path.stat().st_size if sizes else -1
            except FileNotFoundError:
                continue  # claimed and replayed meanwhile
            found.append((int(match[1]), int(match[2]), int(match[3]), path, size))
    return sorted(found)


def _inspect(folder: Path, active: Path | None, count_records: bool) -> list[SegmentInfo]:
    infos = []
    unsafe = folder_refusal(folder.parent, folder) is not None
    for time_ns, pid, seq, path, size in _scan(folder, sizes=True):
        state: Literal["active", "locked", "replayable", "refused"] = "active"
        if path != active:
            state = "replayable" if _unlocked(path) else "locked"
            if state == "replayable" and (unsafe or _refused(path)):
                state = "refused"
        records = None
        if count_records:
            with contextlib.suppress(FileNotFoundError):
                records = sum(p is not None for _, p in iter_frames(path.read_bytes(), 0))
        infos.append(SegmentInfo(path, time_ns, pid, seq, size, state, _alive(pid), records))
    return infos


def _refused(path: Path) -> bool:
    try:
        return refusal(path.stat()) is not None
    except FileNotFoundError:
        return False


def _unlocked(path: Path) -> bool:
    """Whether no one holds a lock on ``path`` (probed with a shared lock, dropped at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return pid > 0
