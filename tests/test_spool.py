"""Tests of the disk spool (`allele.observability.spool`) on real files."""

from __future__ import annotations

import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import pytest

from allele.observability.spool.claims import Claim
from allele.observability.spool.frames import MAX_RECORD_BYTES
from allele.observability.spool.retention import prune
from allele.observability.spool.segments import Spool

DAY = 86400.0

HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("ready", flush=True)
sys.stdin.read()
"""

APPEND_THEN_WAIT = """
import sys
from pathlib import Path
from allele.observability.spool.segments import Spool
spool = Spool(Path(sys.argv[1]), segment_bytes=4096)
for i in range(int(sys.argv[2])):
    assert spool.append({"i": i, "values": [i * 0.5, float("nan"), "x" * 20]})
print("ready", flush=True)
sys.stdin.read()
"""


def replay(spool: Spool) -> list[object]:
    """Claim every replayable segment, read it and mark it done."""
    records: list[object] = []
    for claim in spool.claim():
        with claim:
            records += [record for _, record in claim.records()]
            claim.done()
    return records


def only_claim(spool: Spool) -> Claim:
    """The single claimable segment (left held: the caller finishes it)."""
    return next(spool.claim())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_round_trip_preserves_values(tmp_path: Path) -> None:
    """NaN, +-inf, -0.0, None, bools, unicode and nesting come back exactly; tuples as lists."""
    records: list[object] = [
        float("nan"),
        float("inf"),
        float("-inf"),
        -0.0,
        None,
        True,
        "générations ✓ 世代 \x00",
        [1, [2.5, [None, "a"]], {"k": [float("nan")]}],
        {"run": "r1", "rows": [["fitness.best", 0.1, 1700000000000, 3]]},
        ("metric", ("loss", float("inf"), 12, 0)),
        2**70,
    ]
    spool = Spool(tmp_path)
    for record in records:
        assert spool.append(record)

    expected = [
        *records[:-2],
        ["metric", ["loss", float("inf"), 12, 0]],
        2**70,
    ]
    assert repr(expected) == repr(replay(spool))


def test_rotation_keeps_order(tmp_path: Path) -> None:
    """Small segments rotate often; replay returns every record in append order."""
    spool = Spool(tmp_path, segment_bytes=256)
    for i in range(300):
        spool.append(["metric", i, "x" * (i % 40)])

    infos = spool.segments()
    assert len(infos) > 20
    assert all(info.size <= 256 for info in infos)
    assert [["metric", i, "x" * (i % 40)] for i in range(300)] == replay(spool)


def test_files_and_directories_are_private(tmp_path: Path) -> None:
    """Directories are created 0700 and segments, replayed files and offsets 0600."""
    spool = Spool(tmp_path / "spool", segment_bytes=16)
    spool.append("a")
    spool.append("b")
    claims = spool.claim()
    first = next(claims)
    first.done()
    second = next(claims)
    second.release(0)

    directory = tmp_path / "spool"
    assert [0o700, 0o700, 0o700] == [
        mode(p) for p in (directory, directory / "segments", directory / "replayed")
    ]
    assert [0o600, 0o600, 0o600] == [
        mode(p)
        for p in (
            directory / "replayed" / first.path.name,
            second.path,
            second.path.with_name(second.path.name + ".offset"),
        )
    ]


def test_append_refuses_when_full(tmp_path: Path) -> None:
    """Past max_bytes append returns False, writes nothing and counts a drop."""
    spool = Spool(tmp_path, max_bytes=1000, segment_bytes=300)
    results = [spool.append({"i": i, "pad": "x" * 40}) for i in range(30)]
    accepted = results.count(True)

    stats = spool.stats()
    assert 0 < accepted < 30
    assert [True] * accepted + [False] * (30 - accepted) == results
    assert (accepted, 30 - accepted) == (stats.records_written, stats.dropped_full)
    assert stats.bytes <= 1000
    assert accepted == len(replay(spool))


def test_done_frees_space_for_appends(tmp_path: Path) -> None:
    """Once replayed segments leave the live set, a full spool accepts records again."""
    spool = Spool(tmp_path, max_bytes=200)
    while spool.append("x" * 30):
        pass
    replay(spool)

    assert spool.append("again")
    assert (1, 15) == spool.stats()[:2]


def test_unencodable_record_raises_and_writes_nothing(tmp_path: Path) -> None:
    """A record JSON cannot encode raises TypeError at the call; too large a record ValueError."""
    spool = Spool(tmp_path)
    with pytest.raises(TypeError):
        spool.append({"genome": object()})
    with pytest.raises(ValueError, match="exceeds"):
        spool.append("x" * MAX_RECORD_BYTES)

    assert 0 == spool.stats().records_written
    assert not (tmp_path / "segments").exists()


def test_truncated_last_record_is_skipped(tmp_path: Path) -> None:
    """A record cut short at the end is skipped and counted; all earlier ones are read."""
    spool = Spool(tmp_path)
    for i in range(5):
        spool.append({"i": i})
    spool.close()
    path = spool.segments()[0].path
    os.truncate(path, path.stat().st_size - 3)

    assert [{"i": i} for i in range(4)] == replay(spool)
    assert 1 == spool.stats().corrupt_records_skipped


@pytest.mark.parametrize("where", [2, 5, 8, 15], ids=["length", "crc", "payload0", "payload"])
def test_damaged_middle_record_is_skipped(tmp_path: Path, where: int) -> None:
    """A flipped byte in the middle record loses only that record: reading resyncs after it."""
    spool = Spool(tmp_path)
    for i in range(3):
        spool.append({"i": i, "pad": "y" * 20})
    with only_claim(spool) as claim:
        offsets = [offset for offset, _ in claim.records()]
    data = bytearray(claim.path.read_bytes())
    data[offsets[1] + where] ^= 0x5A
    claim.path.write_bytes(bytes(data))

    assert [{"i": 0, "pad": "y" * 20}, {"i": 2, "pad": "y" * 20}] == replay(spool)
    assert 1 == spool.stats().corrupt_records_skipped


def test_zero_filled_tail_and_garbage_are_skipped(tmp_path: Path) -> None:
    """Undecodable frames, garbage and zero fill (power loss) are skipped; valid frames survive."""
    spool = Spool(tmp_path)
    spool.append("before")
    path = spool.segments()[0].path
    with path.open("ab") as fh:
        fh.write(struct.pack(">II", 5, zlib.crc32(b"{{{{{")) + b"{{{{{")  # not JSON
        fh.write(os.urandom(300).replace(b"\0", b"1"))
    spool.append("after")
    with path.open("ab") as fh:
        fh.write(b"\x00" * 100_000)

    assert ["before", "after"] == replay(spool)
    assert 3 == spool.stats().corrupt_records_skipped


def test_second_instance_cannot_claim_locked_segments(tmp_path: Path) -> None:
    """Another spool skips a segment still being written and one claimed by someone else."""
    writer = Spool(tmp_path)
    other = Spool(tmp_path)
    writer.append("w")

    assert [] == list(other.claim())
    with only_claim(writer) as claim:
        assert [] == list(other.claim())
        assert [(0, "w")] == list(claim.records())
    assert ["w"] == replay(other)


def test_segment_locked_by_another_process_is_skipped(tmp_path: Path) -> None:
    """A segment flock-ed by another process is not claimable until that process lets go."""
    spool = Spool(tmp_path)
    spool.append("x")
    spool.close()
    path = spool.segments()[0].path

    with child(HOLD_LOCK, str(path)) as proc:
        assert proc.stdout is not None
        assert "ready\n" == proc.stdout.readline()
        assert [] == list(spool.claim())
        assert ["locked"] == [info.state for info in spool.segments()]
        proc.communicate("")
    assert ["x"] == replay(spool)


def test_done_moves_to_replayed(tmp_path: Path) -> None:
    """done() moves the segment to replayed/ (kept for retention) and counts it."""
    spool = Spool(tmp_path)
    spool.append("a")
    claim = only_claim(spool)
    claim.done()

    assert [] == spool.segments()
    assert [claim.path.name] == os.listdir(tmp_path / "replayed")
    assert 1 == spool.stats().replayed_segments
    assert [] == list(spool.claim())


def test_release_keeps_segment_and_resumes_at_offset(tmp_path: Path) -> None:
    """release(offset) keeps the segment; the next claim starts at that record."""
    spool = Spool(tmp_path)
    for i in range(10):
        spool.append(i)
    with only_claim(spool) as claim:
        offsets = [offset for offset, _ in claim.records()]
        claim.release(offsets[4])

    again = Spool(tmp_path)
    with only_claim(again) as resumed:
        assert offsets[4] == resumed.start
        assert list(zip(offsets[4:], range(4, 10), strict=True)) == list(resumed.records())
        resumed.done()
    assert not resumed.path.with_name(resumed.path.name + ".offset").exists()


def test_release_at_position_resumes_after_last_yielded(tmp_path: Path) -> None:
    """Stopping early with release(position) resumes right after the last record yielded."""
    spool = Spool(tmp_path)
    for i in range(5):
        spool.append(i)
    with only_claim(spool) as claim:
        for _, record in claim.records():
            if record == 2:
                break
        claim.release(claim.position)

    assert [3, 4] == replay(spool)


def test_release_without_offset_replays_everything(tmp_path: Path) -> None:
    """Leaving a claim unfinished keeps every record for the next replay."""
    spool = Spool(tmp_path)
    spool.append("a")
    spool.append("b")
    for claim in spool.claim():
        next(iter(claim.records()))

    assert ["a", "b"] == replay(spool)


def test_dead_writer_segment_is_replayable(tmp_path: Path) -> None:
    """A segment named after a pid that no longer exists is listed as such and replayed."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(done.stdout)
    writer = Spool(tmp_path)
    writer.append({"from": "dead"})
    writer.close()
    path = writer.segments()[0].path
    time_ns, _, seq = path.name[4:-6].split("-")
    path.rename(path.with_name(f"seg-{time_ns}-{dead_pid}-{seq}.spool"))

    reader = Spool(tmp_path)
    info = reader.segments()[0]
    assert (dead_pid, False, "replayable") == (info.pid, info.owner_alive, info.state)
    assert [{"from": "dead"}] == replay(reader)


def test_records_survive_sigkill(tmp_path: Path) -> None:
    """A writer killed with SIGKILL leaves every appended record for a new spool to replay."""
    with child(APPEND_THEN_WAIT, str(tmp_path), "500") as proc:
        assert proc.stdout is not None
        assert "ready\n" == proc.stdout.readline()
        assert "locked" == Spool.inspect(tmp_path)[-1].state
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    spool = Spool(tmp_path)
    records = replay(spool)
    assert list(range(500)) == [r["i"] for r in records if isinstance(r, dict)]
    assert 500 == len(records)
    assert 0 == spool.stats().corrupt_records_skipped


def test_forked_child_writes_its_own_segment(tmp_path: Path) -> None:
    """After fork the child appends to a segment of its own; the parent's stays locked."""
    spool = Spool(tmp_path)
    spool.append("parent-1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = 0 if spool.append("child") else 2
            spool.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    spool.append("parent-2")

    assert 0 == os.waitstatus_to_exitcode(status)
    assert [os.getpid(), pid] == [info.pid for info in spool.segments()]
    assert ["child"] == replay(Spool(tmp_path))
    assert ["parent-1", "parent-2"] == replay(spool)


def test_many_threads_lose_nothing(tmp_path: Path) -> None:
    """Concurrent appends across rotations keep every record and each thread's order."""
    spool = Spool(tmp_path, segment_bytes=512)

    def produce(thread: int) -> None:
        for i in range(300):
            spool.append([thread, i])

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = replay(spool)

    assert 2400 == len(records)
    for t in range(8):
        assert [[t, i] for i in range(300)] == [
            r for r in records if isinstance(r, list) and r[0] == t
        ]


def test_segments_report_state_and_records(tmp_path: Path) -> None:
    """segments() tells active, locked and replayable segments apart and counts records."""
    spool = Spool(tmp_path)
    spool.append(1)
    spool.close()
    spool.append(2)
    spool.append(3)
    other = Spool(tmp_path)
    other.append(4)

    infos = spool.segments(count_records=True)
    assert ["replayable", "active", "locked"] == [info.state for info in infos]
    assert [1, 2, 1] == [info.records for info in infos]
    assert [None] * 3 == [info.records for info in spool.segments()]
    assert (3, sum(i.size for i in infos)) == spool.stats()[:2]


def test_inspect_creates_nothing(tmp_path: Path) -> None:
    """Inspecting or constructing a spool on a missing directory creates nothing."""
    missing = tmp_path / "missing"
    spool = Spool(missing)

    assert [] == Spool.inspect(missing)
    assert [] == list(spool.claim())
    assert (0, 0) == spool.stats()[:2]
    assert not missing.exists()


def test_prune_removes_only_old_local_files(tmp_path: Path) -> None:
    """prune() deletes old replayed files, dead letters, tracebacks; never live segments."""
    now = time.time()
    old = now - 10 * DAY
    spool = Spool(tmp_path, segment_bytes=16)
    for name in ("old", "fresh", "live"):
        spool.append(name)
    claims = spool.claim()
    old_claim = next(claims)
    old_claim.done()
    fresh_claim = next(claims)
    fresh_claim.done()
    live = spool.segments()[0].path
    orphan = live.with_name("seg-00000000000000000001-1-000001.spool.offset")
    orphan.write_text("0")
    (tmp_path / "dead-letters.jsonl").write_text("{}\n")
    for run in ("run-old", "run-new"):
        (tmp_path / "tracebacks" / run).mkdir(parents=True)
        (tmp_path / "tracebacks" / run / "traceback.txt").write_text("Traceback")
    old_paths = [
        tmp_path / "replayed" / old_claim.path.name,
        live,
        orphan,
        tmp_path / "dead-letters.jsonl",
        tmp_path / "tracebacks" / "run-old" / "traceback.txt",
        tmp_path / "tracebacks" / "run-old",
    ]
    for path in old_paths:
        os.utime(path, (old, old))

    removed = prune(tmp_path, older_than_days=7, now=now)

    assert sorted(
        [
            tmp_path / "dead-letters.jsonl",
            tmp_path / "replayed" / old_claim.path.name,
            orphan,
            tmp_path / "tracebacks" / "run-old",
        ]
    ) == sorted(removed)
    assert [fresh_claim.path.name] == os.listdir(tmp_path / "replayed")
    assert ["run-new"] == os.listdir(tmp_path / "tracebacks")
    assert ["live"] == replay(spool)
