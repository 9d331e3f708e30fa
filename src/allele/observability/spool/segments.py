"""
The disk spool: records that could not be delivered, kept on disk until a replay delivers them.

Layout of a spool directory (directories are created with mode 0700, files with 0600)::

    <spool_dir>/
      segments/seg-<time_ns:020d>-<pid>-<seq:06d>.spool   live segments, replayed oldest first
      segments/seg-<...>.spool.offset                      where the next replay of it resumes
      replayed/seg-<...>.spool                             delivered; retention deletes them
      dead-letters.jsonl, tracebacks/                      written elsewhere; retention too

A segment is a sequence of frames, with no file header::

    +-----------------+-----------------+------------------------+
    | length: u32, BE | crc32: u32, BE  | payload: length bytes  |
    +-----------------+-----------------+------------------------+

``crc32`` is ``zlib.crc32(payload)`` and ``1 <= length < 2**24``. The payload is one record
as compact ASCII JSON (``allow_nan=True``): NaN and +-inf round-trip exactly, tuples come back
as lists, non-string dict keys as strings, and reading a file can never execute code. ASCII
JSON holds no zero byte, while a length field starts with one: after a damaged frame the
reader tries only offsets that hold a zero byte and resumes at the first whole frame whose
payload holds no zero byte and matches its CRC. A damaged stretch counts as one corrupt record.

Writing: each process appends to a segment of its own, named after its wall-clock creation
time (kept increasing within a process), the pid and a per-process sequence number; segments
replay in that order. A frame is written with one ``os.write`` on an ``O_APPEND`` descriptor.
A segment is created as ``.seg-<...>.spool.tmp``, locked with ``flock(LOCK_EX)`` and renamed
into place, so a visible segment is locked by its writer from birth until the writer closes
it (past ``segment_bytes``, ``close()``, ``claim()``) or dies: the kernel drops the locks of
a dead process. A forked child closes its copy of the parent's descriptor without unlocking.

Replay: a reader claims a segment with ``flock(LOCK_EX | LOCK_NB)`` and skips it if that
fails (still being written, or claimed by another reader). The lock decides, not the pid in
the name: pids are reused. ``Claim.done()`` moves the segment to ``replayed/``;
``Claim.release(offset)`` leaves it in place and writes the offset of the first undelivered
record, in ASCII decimal, to ``<segment>.offset`` (through a rename: whole or absent).

What a crash can lose: after ``kill -9``, every record whose ``append`` returned is on disk
(the kernel holds it); a write cut short by the kill leaves one partial frame at the end,
which replay skips and counts as corrupt. A power loss also loses what was appended since the
last ``flush(fsync=True)``. Replay is at-least-once: a crash between delivering records and
``done()`` or ``release(offset)`` delivers them again, so the consumer must be idempotent
(MLflow ignores a re-sent metric with the same timestamp). Empty ``.tmp`` files left by a
crash during segment creation are removed by :func:`prune`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import struct
import threading
import time
import weakref
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from ..sinks.deadletter import DEAD_LETTER_FILE

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import TracebackType

    from typing_extensions import Self

__all__ = ("MAX_RECORD_BYTES", "Claim", "SegmentInfo", "Spool", "SpoolStatistics", "prune")

#: the largest payload of one record (the length's top byte is always zero)
MAX_RECORD_BYTES = (1 << 24) - 1
SEGMENTS, REPLAYED, TRACEBACKS = "segments", "replayed", "tracebacks"
_HEADER = struct.Struct(">II")
_NAME = re.compile(r"seg-(\d{20})-(\d+)-(\d{6,})\.spool")
_NONZERO = re.compile(rb"[^\x00]")
_RESCAN_SECONDS = 1.0
_encode = json.JSONEncoder(allow_nan=True, separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


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
    #: "active" (this spool's open segment), "locked" (written or claimed elsewhere), "replayable"
    state: Literal["active", "locked", "replayable"]
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
        payload = _encode(record).encode("ascii")
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
        frame = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
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
        for folder in (self.directory, self._folder):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        self._seq += 1
        path = self._folder / f"seg-{self._last_ns:020d}-{self._pid}-{self._seq:06d}.spool"
        temporary = path.with_name(f".{path.name}.tmp")
        fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND, 0o600)
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

    def claim(self) -> Iterator[Claim]:
        """
        Yield the replayable segments, oldest first, each locked for this caller alone.

        The current segment of this spool is closed first, so its records are included.
        Segments locked elsewhere are skipped. A claim still unfinished when the next one is
        requested is released; otherwise the caller finishes it (``done``, ``release``, or
        leaving its ``with`` block).
        """
        self.close()
        for _, _, _, path, _ in _scan(self._folder):
            claim = Claim._acquire(self, path)
            if claim is not None:
                yield claim
                claim.release()

    def _count(self, *, corrupt: int = 0, replayed: int = 0, freed: int = 0) -> None:
        with self._lock:
            self._corrupt += corrupt
            self._replayed += replayed
            if self._total is not None:
                self._total = max(0, self._total - freed)


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

    @classmethod
    def _acquire(cls, spool: Spool, path: Path) -> Claim | None:
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
        return cls(spool, path, fd)

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
        for offset, payload in _frames(data, self.start if self.start <= len(data) else 0):
            if payload is not None:
                try:
                    record = _decode(payload.decode("ascii"))
                except (ValueError, RecursionError):
                    pass
                else:
                    self.position = offset + _HEADER.size + len(payload)
                    yield offset, record
                    continue
            self._spool._count(corrupt=1)

    def done(self) -> None:
        """Everything was delivered: move the segment to ``replayed/`` and release it."""
        if self._fd is None:
            raise RuntimeError(f"claim of {self.path} is finished")
        fd, self._fd = self._fd, None
        try:
            size = os.fstat(fd).st_size
            target = self._spool.directory / REPLAYED / self.path.name
            target.parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(self.path, target)
            os.utime(target)  # retention counts from the replay
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._sidecar)
        finally:
            os.close(fd)
        self._spool._count(replayed=1, freed=size)

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
                out = os.open(temporary, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
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


def prune(directory: Path, *, older_than_days: float, now: float | None = None) -> list[Path]:
    """
    Delete local files older than the retention limit; live segments are never touched.

    Removes replayed segments, the dead-letter file, entries of ``tracebacks/`` (a folder
    goes when everything in it is old), and leftover temporary and resume-offset files whose
    segment is gone.

    Args:
        directory: the spool directory.
        older_than_days: remove what was last modified longer ago than this.
        now: the current time in seconds since the epoch; defaults to ``time.time()``.

    Returns:
        The paths removed.
    """
    if older_than_days < 0:
        raise ValueError(f"older_than_days must be >= 0, got {older_than_days}")
    cutoff = (time.time() if now is None else now) - older_than_days * 86400
    directory = Path(directory)
    candidates = [*_children(directory / REPLAYED), directory / DEAD_LETTER_FILE]
    candidates += _children(directory / TRACEBACKS)
    candidates += [
        path
        for path in _children(directory / SEGMENTS)
        if (path.name.startswith(".") and path.name.endswith(".tmp"))
        or (path.name.endswith(".spool.offset") and not path.with_suffix("").exists())
    ]
    removed = []
    for path in candidates:
        try:
            stamps = [path.lstat().st_mtime]
            if path.is_dir() and not path.is_symlink():
                for root, _, files in os.walk(path):
                    stamps += [os.lstat(os.path.join(root, f)).st_mtime for f in files]
            if max(stamps) >= cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


def _scan(folder: Path, *, sizes: bool = False) -> list[tuple[int, int, int, Path, int]]:
    """The live segments as ``(time_ns, pid, seq, path, size or -1)``, oldest first."""
    found = []
    for path in _children(folder):
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
    for time_ns, pid, seq, path, size in _scan(folder, sizes=True):
        state: Literal["active", "locked", "replayable"] = "active"
        if path != active:
            state = "replayable" if _unlocked(path) else "locked"
        records = None
        if count_records:
            with contextlib.suppress(FileNotFoundError):
                records = sum(p is not None for _, p in _frames(path.read_bytes(), 0))
        infos.append(SegmentInfo(path, time_ns, pid, seq, size, state, _alive(pid), records))
    return infos


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


def _frames(data: bytes, pos: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(offset, payload)`` per whole frame and ``(offset, None)`` per damaged stretch."""
    while pos < len(data):
        end = _frame_end(data, pos)
        if end > 0:
            yield pos, data[pos + _HEADER.size : end]
            pos = end
            continue
        yield pos, None
        pos = _resync(data, pos + 1)


def _resync(data: bytes, pos: int) -> int:
    """The offset of the next whole frame from ``pos`` on, else ``len(data)``."""
    while (zero := data.find(b"\x00", pos)) >= 0:
        nonzero = _NONZERO.search(data, zero)
        if nonzero is None:
            break
        # a frame starts with a zero byte and has a nonzero byte among the next three
        for start in range(max(zero, nonzero.start() - 3), nonzero.start()):
            if _frame_end(data, start) > 0:
                return start
        pos = nonzero.start() + 1
    return len(data)


def _frame_end(data: bytes, pos: int) -> int:
    """The end offset of a whole frame with a matching CRC at ``pos``, else -1."""
    if pos + _HEADER.size > len(data):
        return -1
    length, crc = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length
    if not 0 < length <= MAX_RECORD_BYTES or end > len(data):
        return -1
    if data.find(b"\x00", pos + _HEADER.size, end) >= 0:  # cheap: rejects most garbage
        return -1
    return end if zlib.crc32(memoryview(data)[pos + _HEADER.size : end]) == crc else -1
