"""
Soak: a long experiment against a real ``mlflow server`` that is killed again and again,
with a poison event every few seconds; then every event is checked against MLflow itself.

    PYTHONPATH=src .venv/bin/python benchmarks/soak.py            # 10 min (issue 9 item 10)
    PYTHONPATH=src .venv/bin/python benchmarks/soak.py --quick    # ~2 min, for development

Two processes: this one (the harness) owns the server (``tests/servers.py``
``MlflowServer``), kills it with SIGKILL on a schedule and restarts it on the same port,
prints the table and checks the result; a child process (the experiment: this file with
``--child``) emits from 2 threads at a paced rate, opens a phase per generation and
injects the poison events. The child reports on a pipe (one JSON object per line); the
harness kills it if it outlives a hard wall-clock deadline. See docs/reliability.md, Soak.

Exit status: 0 all verdicts passed; 1 something was lost or duplicated, the accounting did
not balance, or a poison event is unaccounted for; 2 the harness had to kill the
experiment (it hung) or the experiment died; 3 only the RSS verdict failed.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import http.client
import itertools
import json
import math
import os
import queue
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import (  # noqa: E402
    LoadMeter,
    Section,
    json_safe,
    machine_info,
    progress,
    quiet_logs,
    table,
)

_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Group|Interrupt)\b.*")
POISONS = ("step", "artifact", "alert", "genome", "detector")
ODD_ALERT_NAMES = ("/", "a//b", "..", "/leading")
KEYS_PER_THREAD = 10
THREADS = 2
KINDS = ("metric", "param", "tag", "run", "artifact", "alert", "phase", "genome", "system")
COLUMNS = (
    ("elapsed", 7),
    ("server", 6),
    ("sent", 9),
    ("emitted", 9),
    ("delivered", 9),
    ("dead", 6),
    ("spooled", 8),
    ("pending", 8),
    ("dropped", 7),
    ("rss_MB", 7),
    ("spool_MB", 8),
    ("state", 26),
)


# == the experiment (child process) =======================================================
class _Reporter:
    """JSON lines to the harness on the original stdout (fd 1 then points at stderr)."""

    def __init__(self) -> None:
        self._fd = os.dup(1)
        os.dup2(2, 1)  # whatever else prints to stdout goes to the log, not into the pipe
        sys.stdout = sys.stderr
        self._lock = threading.Lock()

    def send(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"type": kind, **fields}, default=str) + "\n"
        with self._lock:
            os.write(self._fd, line.encode())


class RaiseOnce:
    """A detector whose ``observe`` raises the first time it sees a metric."""

    def __init__(self, index: int) -> None:
        self.name = f"soak-raise-once-{index}"
        self.alert_name = "soak.raise_once"
        self.raised_at: float | None = None

    def observe(self, _run_key: str, name: str, _value: float, _step: int) -> list[Any]:
        if self.raised_at is None:
            self.raised_at = time.time()
            raise RuntimeError(f"soak poison: detector {self.name} raised on {name!r}")
        return []

    def reset(self, run_key: str | None = None) -> None:
        pass

    def __repr__(self) -> str:
        return f"RaiseOnce({self.name!r})"


def _dir_bytes(path: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for root, _dirs, files in os.walk(path):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, f)).st_size
    return total


def _stats(obs: Any) -> dict[str, Any]:
    try:
        s = obs.stats()
    except Exception as exc:  # the row says so instead of the child dying
        return {"error": f"{type(exc).__name__}: {exc}"}
    kinds = {k: getattr(s, k)._asdict() for k in KINDS if hasattr(s, k)}
    total = {f: sum(v[f] for v in kinds.values()) for f in next(iter(kinds.values()))}
    return {
        "state": s.state,
        "kinds": kinds,
        "total": total,
        "drop_reasons": dict(s.drop_reasons),
        "failures": dict(s.failures),
        "balanced": bool(s.is_balanced()),
    }


def _exporter_alive() -> bool:
    return any(t.name.startswith("allele-exporter") and t.is_alive() for t in threading.enumerate())


class Emitter:
    """One producer thread: ``rate`` metrics/s over KEYS_PER_THREAD keys, paced."""

    def __init__(self, obs: Any, index: int, rate: float, stop: threading.Event) -> None:
        self.obs = obs
        self.index = index
        self.rate = rate
        self.stop = stop
        self.sent = 0
        self.errors: list[str] = []
        self.keys = [f"soak.t{index}.m{j}" for j in range(KEYS_PER_THREAD)]

    def run(self) -> None:
        metric = self.obs.metric
        keys = self.keys
        n = 0
        tick = 0.01
        t0 = time.perf_counter()
        k = 0
        while not self.stop.is_set():
            due = int((time.perf_counter() - t0) * self.rate)
            while n < due:
                j = n % KEYS_PER_THREAD
                step = n // KEYS_PER_THREAD
                try:
                    metric(keys[j], step * 0.001 + j, step)
                except Exception as exc:  # the soak goes on; the error is reported
                    if len(self.errors) < 20:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                n += 1
                self.sent = n
            k += 1
            delay = t0 + k * tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                k = int((time.perf_counter() - t0) / tick)  # behind: skip the missed ticks

    def expected(self) -> dict[str, int]:
        """Points per key: key j got steps 0 .. count-1."""
        q, r = divmod(self.sent, KEYS_PER_THREAD)
        return {key: q + (1 if j < r else 0) for j, key in enumerate(self.keys)}


class Poisoner:
    """Injects one poison event of each kind in turn and logs what happened at the call."""

    def __init__(self, obs: Any, run: Any, kinds: list[str], workdir: Path) -> None:
        self.obs = obs
        self.run = run
        self.kinds = kinds
        self.workdir = workdir
        self.log: list[dict[str, Any]] = []
        self.detectors: list[RaiseOnce] = []

    def inject(self, elapsed: float) -> None:
        i = len(self.log)
        kind = self.kinds[i % len(self.kinds)]
        entry: dict[str, Any] = {"index": i, "kind": kind, "elapsed": round(elapsed, 1)}
        try:
            entry["marker"] = getattr(self, f"_{kind}")(i)
            entry["at_call"] = "accepted"
        except Exception as exc:
            entry["at_call"] = f"refused: {type(exc).__name__}: {exc}"[:300]
            entry.setdefault("marker", None)
        self.log.append(entry)

    def _step(self, i: int) -> str:
        key = f"poison.step.{i}"
        self.obs._bus._data.append((self.run.key, key, 1.0, time.time_ns(), 2**63))
        return key

    def _artifact(self, i: int) -> str:
        path = self.workdir / f"soak-poison-artifact-{i}.txt"
        path.write_text(f"poison {i}\n")
        try:
            self.obs.artifact(path)
        finally:
            path.unlink()
        return path.name

    def _alert(self, i: int) -> str:
        marker = f"soak-poison-alert-{i}"
        name = ODD_ALERT_NAMES[(i // len(self.kinds)) % len(ODD_ALERT_NAMES)]
        self.obs.alert(name, severity="warning", message=marker, attributes={"poison": i})
        return marker

    def _genome(self, i: int) -> str:
        marker = f"soak-poison-genome-{i}"
        bus = self.obs._bus
        captured: list[Any] = []
        real = bus.control
        # Let the bus build the payload as it does today, then spoil its tags.
        bus.control = lambda kind, event: captured.append((kind, event))
        try:
            self.obs.genome([i, 1, 2, 3], name="soak_poison", tags={"poison": marker})
        finally:
            del bus.control  # back to the class's method
            assert bus.control == real
        if captured:
            kind, event = captured[0]
            payload = dict(event[2])
        else:  # the genome path no longer goes through control(): build it by hand
            kind = "genome"
            payload = {"genome_id": marker, "text": "[]", "name": "soak_poison"}
        payload["tags"] = {"poison": marker, "not_json": object()}
        bus.control(kind, ("genome", self.run, payload))
        return marker

    def _detector(self, i: int) -> str:
        det = RaiseOnce(i)
        self.detectors.append(det)
        self.obs.add_detector(det)
        return det.name


def child_main(cfg: dict[str, Any]) -> int:
    import logging

    import psutil

    from allele.observability import Observability

    out = _Reporter()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    workdir = Path(cfg["workdir"])
    spool = workdir / "spool"
    proc = psutil.Process()
    obs = Observability(
        tracking_uri=cfg["url"],
        spool_dir=spool,
        experiment_prefix="",
        system_metrics_interval=cfg["system_interval"],
    )
    obs.start()
    params = {"rate": cfg["rate"], "threads": THREADS, "keys_per_thread": KEYS_PER_THREAD}
    with obs.run("soak", experiment="soak", params=params, tags={"bench": "soak"}) as run:
        obs.params({"minutes": cfg["minutes"], "poison_every": cfg["poison_every"]})
        obs.tag("soak.mode", cfg["mode"])
        out.send("ready", pid=os.getpid(), run_key=run.key)
        stop = threading.Event()
        emitters = [Emitter(obs, t, cfg["rate"] / THREADS, stop) for t in range(THREADS)]
        threads = [
            threading.Thread(
                target=contextvars.copy_context().run, args=(e.run,), name=f"soak-emit-{e.index}"
            )
            for e in emitters
        ]
        poisoner = Poisoner(obs, run, cfg["poisons"], workdir)
        rss: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        for th in threads:
            th.start()

        def row(elapsed: float) -> None:
            out.send(
                "row",
                elapsed=round(elapsed, 1),
                sent=sum(e.sent for e in emitters),
                stats=_stats(obs),
                rss=proc.memory_info().rss,
                spool_bytes=_dir_bytes(spool / "segments"),
                spool_dir_bytes=_dir_bytes(spool),
                exporter_alive=_exporter_alive(),
                lane=obs._bus.lane_length(),
            )

        duration = cfg["minutes"] * 60.0
        next_poison = cfg["poison_every"] or math.inf
        next_row = cfg["row_every"]
        gen = 0
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed >= duration:
                break
            with obs.phase("generation"):
                rss.append((round(elapsed, 2), proc.memory_info().rss))
                if elapsed >= next_poison:
                    poisoner.inject(elapsed)
                    next_poison += cfg["poison_every"]
                if elapsed >= next_row:
                    row(elapsed)
                    next_row += cfg["row_every"]
                gen += 1
                delay = t0 + gen * 0.5 - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        stop.set()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t0
        row(elapsed)
        expected: dict[str, int] = {}
        for e in emitters:
            expected.update(e.expected())
        out.send(
            "emitting_done",
            elapsed=round(elapsed, 1),
            generations=gen,
            expected=expected,
            emit_errors=[err for e in emitters for err in e.errors],
            rss=rss,
            poisons=poisoner.log,
        )
        # The harness answers once the server is up again.
        ready, _, _ = select.select([sys.stdin], [], [], cfg["close_wait"])
        if ready:
            sys.stdin.readline()
    # the run has ended (its end is queued); now close with the server up
    t1 = time.perf_counter()
    obs.close(timeout=cfg["close_timeout"])
    close_s = time.perf_counter() - t1
    deadline = time.monotonic() + 30
    while obs.stats().state != "closed" and time.monotonic() < deadline:
        time.sleep(0.05)
    row(time.perf_counter() - t0)
    out.send(
        "final",
        close_s=round(close_s, 2),
        stats=_stats(obs),
        exporter_alive=_exporter_alive(),
        run_id=run.created_id if hasattr(run, "created_id") else None,
        detectors_raised=[d.raised_at is not None for d in poisoner.detectors],
        spool_bytes=_dir_bytes(spool / "segments"),
    )
    return 0


# == the harness (this process) ===========================================================
def _fmt_row(cells: list[str]) -> str:
    return "  ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True))


def _row_cells(msg: dict[str, Any], server: str, prev: dict[str, Any] | None) -> list[str]:
    st = msg["stats"]
    if "error" in st:
        tot: dict[str, Any] = {}
        state = "stats() raised"
    else:
        tot = st["total"]
        state = st["state"] + ("" if msg["exporter_alive"] else "/NO-THREAD")
        # nothing delivered since the last row, although there is work and a server
        before = (prev or {}).get("stats", {}).get("total")
        idle = before is not None and tot["delivered"] == before["delivered"]
        if idle and server == "up" and tot["pending"] + tot["spooled"] > 0:
            state += " STALLED"

    def num(field: str) -> str:
        return f"{tot[field]:,}" if field in tot else "?"

    return [
        f"{msg['elapsed']:.0f}s",
        server,
        f"{msg['sent']:,}",
        num("emitted"),
        num("delivered"),
        num("dead_lettered"),
        num("spooled"),
        num("pending"),
        num("dropped"),
        f"{msg['rss'] / 2**20:.1f}",
        f"{msg['spool_bytes'] / 2**20:.2f}",
        state,
    ]


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.duration = args.minutes * 60.0
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.rows: list[dict[str, Any]] = []
        self.server_state = "up"
        self.events: list[dict[str, Any]] = []
        self.last_message = time.monotonic()
        #: CPU seconds of server workers we killed (orphans: never reaped, so not ours)
        self.server_cpu_lost = 0.0
        #: how long the last server start took (to start the next one early enough)
        self.start_s = 0.0

    # -- server ------------------------------------------------------------------------
    def _kill(self, server: Any) -> None:
        """SIGKILL the server's process group, keeping the CPU its workers had used."""
        self.server_cpu_lost += _tree_cpu(server)
        server.stop(signal.SIGKILL)

    def _restart(self, server: Any) -> float:
        """Restart on the same port; returns the seconds it took to answer /health."""
        self.server_state = "start"
        t = time.monotonic()
        for attempt in range(3):
            try:
                server.restart()
                break
            except RuntimeError as exc:
                progress(f"server restart failed (attempt {attempt + 1}): {str(exc)[:200]}")
        else:
            raise RuntimeError("mlflow server would not restart")
        self.server_state = "up"
        return time.monotonic() - t

    # -- the child's pipe --------------------------------------------------------------
    def _reader(self, stream: Any) -> None:
        for raw in stream:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            msg["server"] = self.server_state
            self.last_message = time.monotonic()
            if msg["type"] == "row":
                prev = self.rows[-1] if self.rows else None
                self.rows.append(msg)
                print(_fmt_row(_row_cells(msg, self.server_state, prev)), flush=True)
            self.messages.put(msg)
        self.messages.put({"type": "eof"})

    def _wait_for(self, kind: str, until: float) -> dict[str, Any] | None:
        while time.monotonic() < until:
            try:
                msg = self.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg["type"] == kind:
                return msg
            if msg["type"] == "eof":
                return None
        return None

    def run(self) -> int:
        from servers import MlflowServer

        args = self.args
        quiet_logs()
        info = machine_info()
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="allele-soak-"))
        workdir.mkdir(parents=True, exist_ok=True)
        progress(f"workdir {workdir}; {info['cpu_count']} CPUs, Python {info['python']}")
        server = MlflowServer(workdir / "server", startup_timeout=90.0)
        t = time.monotonic()
        server.start()
        self.start_s = time.monotonic() - t
        progress(f"mlflow server up at {server.url}")
        cfg = {
            "workdir": str(workdir),
            "url": server.url,
            "minutes": args.minutes,
            "rate": args.rate,
            "poison_every": args.poison_every,
            "poisons": args.poisons,
            "row_every": args.row_every,
            "close_timeout": args.close_timeout,
            "close_wait": 120.0,
            "system_interval": args.system_interval,
            "mode": "quick" if args.quick else "custom",
        }
        load = LoadMeter()
        child_log = (workdir / "experiment.log").open("wb")
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=child_log,
            text=True,
        )
        reader = threading.Thread(target=self._reader, args=(child.stdout,), daemon=True)
        reader.start()
        result: dict[str, Any] = {"machine": info, "config": cfg, "workdir": str(workdir)}
        guard = {"killed": False, "reason": ""}
        done: dict[str, Any] | None = None
        final: dict[str, Any] | None = None
        try:
            ready = self._wait_for("ready", time.monotonic() + 120)
            if ready is None:
                guard.update(killed=True, reason="the experiment never became ready")
            else:
                start = time.monotonic()
                hard = start + self.duration + args.close_timeout + args.guard_margin
                print(_fmt_row([c for c, _ in COLUMNS]), flush=True)
                print(_fmt_row(["-" * w for _, w in COLUMNS]), flush=True)
                done = self._timeline(server, start, hard)
                if done is not None:
                    if self.server_state != "up" or not server.healthy():
                        self.events.append({"restart_s": self._restart(server), "at": "end"})
                    progress("emitting done; server up; the experiment closes now")
                    with contextlib.suppress(OSError):
                        assert child.stdin is not None
                        child.stdin.write("close\n")
                        child.stdin.flush()
                    final = self._wait_for("final", hard)
                if final is None and child.poll() is None:
                    guard.update(killed=True, reason="hard wall-clock deadline passed")
        finally:
            if child.poll() is None and (guard["killed"] or final is None):
                progress(f"killing the experiment (pid {child.pid}): {guard['reason']}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=30)
            child_log.close()
            result["load"] = load.read(self.server_cpu_lost + _tree_cpu(server))
            try:
                if not server.running or not server.healthy():
                    self._restart(server)
                check = self._verify(server, ready, done, workdir)
            except Exception as exc:  # the report still shows what is known
                check = {"error": f"verification failed: {type(exc).__name__}: {exc}"}
            finally:
                server.cleanup()
        result.update(
            guard=guard,
            child_exit=child.returncode,
            server_events=self.events,
            rows=self.rows,
            emitting_done=done,
            final=final,
            check=check,
        )
        return self._report(result, workdir)

    def _timeline(self, server: Any, start: float, hard: float) -> dict[str, Any] | None:
        """Kill and restart the server on schedule until the child has stopped emitting."""
        a = self.args
        kills = [
            k * a.kill_every
            for k in range(1, int(self.duration // a.kill_every) + 1)
            if a.kill_every > 0 and k * a.kill_every + a.down_for < self.duration - 5
        ]
        down_since: float | None = None
        killed_at = 0.0
        silent_warned = 0.0
        while time.monotonic() < hard:
            now = time.monotonic() - start
            if down_since is None and kills and now >= kills[0]:
                kills.pop(0)
                self.server_state = "down"
                self._kill(server)
                down_since = time.monotonic()
                killed_at = now
                progress(
                    f"t={now:.0f}s: server killed (SIGKILL), to be back after {a.down_for:.0f} s"
                )
            # Start it again early by the time a start takes, so that it answers again
            # about `down_for` seconds after the kill (a start takes 5-30 s here).
            lead = min(self.start_s, a.down_for - 1.0)
            if down_since is not None and time.monotonic() - down_since >= a.down_for - lead:
                took = self._restart(server)
                self.start_s = took
                down = time.monotonic() - down_since
                self.events.append({"killed_at": round(killed_at, 1), "down_s": round(down, 1)})
                progress(f"server back after {down:.1f} s (start {took:.1f} s)")
                down_since = None
            silent = time.monotonic() - self.last_message
            if silent > 2 * a.row_every + 10 and silent - silent_warned > a.row_every:
                silent_warned = silent
                progress(f"no report from the experiment for {silent:.0f} s (stuck?)")
            try:
                msg = self.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg["type"] == "emitting_done":
                return msg
            if msg["type"] == "eof":
                progress("the experiment exited before it finished emitting")
                return None
        return None

    # -- the check against MLflow -----------------------------------------------------
    def _verify(
        self,
        server: Any,
        ready: dict[str, Any] | None,
        done: dict[str, Any] | None,
        workdir: Path,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if ready is None:
            return {"error": "no run"}
        db = server.workdir / "server.db"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        try:
            row = con.execute(
                "SELECT run_uuid FROM tags WHERE key = 'allele.run_key' AND value = ?",
                (ready["run_key"],),
            ).fetchone()
            run_id = row[0] if row else None
            out["run_id"] = run_id
            per_key: dict[str, tuple[int, int, int, int]] = {}
            if run_id:
                for key, n, distinct, lo, hi in con.execute(
                    "SELECT key, COUNT(*), COUNT(DISTINCT step), MIN(step), MAX(step) "
                    "FROM metrics WHERE run_uuid = ? GROUP BY key",
                    (run_id,),
                ):
                    per_key[key] = (n, distinct, lo, hi)
                out["params"] = dict(
                    con.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,))
                )
                out["status"] = con.execute(
                    "SELECT status FROM runs WHERE run_uuid = ?", (run_id,)
                ).fetchone()[0]
        finally:
            con.close()
        expected: dict[str, int] = (done or {}).get("expected", {})
        dead = self._dead_letters(
            workdir,
            (done or {}).get("poisons", []),
            {k: v for k, v in per_key.items() if k.startswith("poison")},
        )
        missing = duplicated = 0
        bad_keys: dict[str, Any] = {}
        for key, want in expected.items():
            n, distinct, lo, hi = per_key.get(key, (0, 0, None, None))
            ok_range = want == 0 or (lo == 0 and hi == want - 1)
            missing += max(0, want - distinct)
            duplicated += n - distinct
            if n != want or distinct != want or not ok_range:
                bad_keys[key] = {"expected": want, "rows": n, "steps": distinct, "range": [lo, hi]}
        out.update(
            expected_metrics=sum(expected.values()),
            in_mlflow=sum(per_key.get(k, (0,))[0] for k in expected),
            missing=missing,
            duplicated=duplicated,
            bad_keys=bad_keys,
            poison_keys_in_mlflow={k: v for k, v in per_key.items() if k.startswith("poison")},
            dead_letters=dead,
        )
        if bad_keys and run_id:  # where are the missing points: spool, dead letters, nowhere?
            out.update(self._locate_missing(db, run_id, bad_keys, workdir / "spool", dead))
        else:
            out.update(in_spool=0, lost=missing - dead["soak_metrics_dead_lettered"])
        if run_id and expected:
            out["rest"] = self._rest_check(server, run_id, expected)
        return out

    def _locate_missing(
        self,
        db: Path,
        run_id: str,
        bad_keys: dict[str, Any],
        spool: Path,
        dead: dict[str, Any],
    ) -> dict[str, Any]:
        """Steps missing from MLflow, split into still in the spool, dead-lettered, lost."""
        spooled, spool_error = _spooled_steps(spool)
        in_spool = dead_lettered = lost = 0
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        try:
            for key, info in bad_keys.items():
                have = {
                    s
                    for (s,) in con.execute(
                        "SELECT DISTINCT step FROM metrics WHERE run_uuid = ? AND key = ?",
                        (run_id, key),
                    )
                }
                gone = set(range(info["expected"])) - have
                held = gone & spooled.get(key, set())
                dl = (gone - held) & dead["soak_steps"].get(key, set())
                info.update(in_spool=len(held), dead_lettered=len(dl))
                in_spool += len(held)
                dead_lettered += len(dl)
                lost += len(gone) - len(held) - len(dl)
        finally:
            con.close()
        return {"in_spool": in_spool, "lost": lost, "spool_error": spool_error}

    def _rest_check(self, server: Any, run_id: str, expected: dict[str, int]) -> dict[str, Any]:
        """The same figures through MLflow's REST API: latest step per key, one full history."""
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)

        def get(path: str, **query: Any) -> dict[str, Any]:
            conn.request("GET", f"/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status} {body[:200]!r}")
            return dict(json.loads(body))

        try:
            latest = {
                m["key"]: m["step"]
                for m in get("runs/get", run_id=run_id)["run"]["data"].get("metrics", [])
            }
            wrong_latest = {
                k: [latest.get(k), want - 1]
                for k, want in expected.items()
                if want and int(latest.get(k, -1)) != want - 1
            }
            key = next(iter(expected))
            hist = get("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
            return {
                "latest_step_wrong": wrong_latest,
                "history_key": key,
                "history_points": len(hist),
                "history_expected": expected[key],
            }
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            conn.close()

    def _dead_letters(
        self, workdir: Path, poisons: list[dict[str, Any]], stored: dict[str, Any]
    ) -> dict[str, Any]:
        path = workdir / "spool" / "dead-letters.jsonl"
        records: list[tuple[str, dict[str, Any]]] = []
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    records.append((line, json.loads(line)))
        outcomes = []
        used: set[int] = set()
        for p in poisons:
            o = {k: p.get(k) for k in ("index", "kind", "elapsed", "marker", "at_call")}
            if p["at_call"] != "accepted":
                o["outcome"] = "refused at the call"
            elif p["kind"] == "detector":
                o["outcome"] = "detector (no event to dead-letter)"
            else:
                hits = [
                    (n, r)
                    for n, (line, r) in enumerate(records)
                    if p["marker"] and p["marker"] in line
                ]
                used.update(n for n, _ in hits)
                with_reason = [r for _, r in hits if r.get("reason") or r.get("message")]
                if with_reason:
                    r = with_reason[0]
                    o["outcome"] = "dead-lettered"
                    o["reason"] = f"{r.get('reason')}: {str(r.get('message'))[:120]}"
                elif p["marker"] in stored:
                    n, _distinct, lo, hi = stored[p["marker"]]
                    o["outcome"] = (
                        f"NOT ACCOUNTED: no dead letter, the server stored {n} point(s) "
                        f"at step {lo}..{hi} (step mangled)"
                    )
                elif p["kind"] in ("alert", "genome"):
                    # An odd alert name with valid characters is sanitised at the call, and a
                    # genome tag value is stored as text: accepted and delivered, not lost.
                    o["outcome"] = "delivered (sanitised: a name at the call, a tag as text)"
                else:
                    o["outcome"] = "NOT ACCOUNTED (no dead letter)"
            outcomes.append(o)
        others = [r for n, (_, r) in enumerate(records) if n not in used]
        soak_rows = 0
        soak_steps: dict[str, set[int]] = {}
        for r in others:
            for row in r.get("rows") or []:
                if isinstance(row, list) and row and str(row[0]).startswith("soak."):
                    soak_rows += 1
                    with contextlib.suppress(IndexError, TypeError, ValueError):
                        soak_steps.setdefault(str(row[0]), set()).add(int(row[3]))
        return {
            "records": len(records),
            "poisons": outcomes,
            "other_records": [
                {k: r.get(k) for k in ("kind", "reason", "message")}
                | {"rows": len(r.get("rows") or [])}
                for r in others[:20]
            ],
            "soak_metrics_dead_lettered": soak_rows,
            "soak_steps": soak_steps,
        }

    # -- verdicts and output -----------------------------------------------------------
    def _report(self, result: dict[str, Any], workdir: Path) -> int:
        args = self.args
        sec = Section("soak")
        check = result["check"]
        final = result["final"]
        done = result["emitting_done"] or {}
        guard = result["guard"]
        sec.add("run time (emitting)", done.get("elapsed"), "s", f"target {self.duration:.0f}")
        sent = sum(done.get("expected", {}).values())
        sec.add("metrics sent by the 2 threads", sent, "events")
        if done.get("elapsed"):
            sec.add("achieved rate", sent / done["elapsed"], "metrics/s", f"target {args.rate:,}")
        downs = [e["down_s"] for e in self.events if "down_s" in e]
        sec.add("server kills (SIGKILL)", len(downs), "events", f"every {args.kill_every:.0f} s")
        if downs:
            sec.add("server down per kill (mean)", sum(downs) / len(downs), "s", "incl. restart")
        sec.add("poison events injected", len(done.get("poisons", [])), "events")
        rates = _delivery_rates(self.rows)
        if rates:
            sec.add("delivery rate, best row interval", max(rates), "metrics/s", "server ingest")
        load = result.get("load", {})
        if load:
            sec.add(
                "other processes' CPU during the soak",
                load["other_cores"],
                "cores",
                f"of {result['machine']['cpu_count']}; this soak: {load['own_cores']:.2f}",
            )

        data_ok = True
        if "error" in check:
            sec.error("check", check["error"])
            data_ok = False
        else:
            missing, lost = check["missing"], check["lost"]
            sec.add("metrics in MLflow", check["in_mlflow"], "events", f"expected {sent:,}")
            sec.add("non-poison metrics not in MLflow", missing, "events", "0", passed=missing == 0)
            sec.add("  of which still in the spool", check["in_spool"], "events")
            sec.add(
                "non-poison metrics lost",
                lost,
                "events",
                "0 (not in MLflow, spool or dead letters)",
                passed=lost == 0,
                note=f"spool unreadable: {check['spool_error']}"
                if check.get("spool_error")
                else "",
            )
            dup = check["duplicated"]
            sec.add("duplicated points", dup, "events", "0", passed=dup == 0)
            status = check.get("status")
            sec.add(
                "run status in MLflow",
                None,
                "",
                f"{status} (FINISHED expected)",
                passed=status == "FINISHED",
            )
            data_ok &= missing == 0 and lost == 0 and dup == 0 and status == "FINISHED"
            rest = check.get("rest", {})
            if "error" in rest:
                sec.error("REST cross-check", rest["error"])
            elif rest:
                ok = (
                    not rest["latest_step_wrong"]
                    and rest["history_points"] == rest["history_expected"]
                )
                sec.add(
                    "REST: latest steps and one history",
                    rest["history_points"],
                    "events",
                    f"expected {rest['history_expected']:,} ({rest['history_key']})",
                    passed=ok,
                )
                data_ok &= ok
            dl = check["dead_letters"]
            unaccounted = [p for p in dl["poisons"] if p["outcome"].startswith("NOT")]
            sec.add(
                "poison events unaccounted for",
                len(unaccounted),
                "events",
                "0 (refused at call or dead-lettered with reason)",
                passed=not unaccounted,
            )
            soak_dl = dl["soak_metrics_dead_lettered"]
            sec.add("non-poison metrics dead-lettered", soak_dl, "events", "0", passed=soak_dl == 0)
            data_ok &= not unaccounted and soak_dl == 0
        if final is None:
            sec.add("close() returned", None, "s", "the experiment never finished", passed=False)
            data_ok = False
        else:
            st = final["stats"]
            sec.add(
                "close(timeout) returned after",
                final["close_s"],
                "s",
                f"timeout {args.close_timeout:.0f}",
            )
            if "error" in st:
                sec.error("final stats", st["error"])
                data_ok = False
            else:
                tot = st["total"]
                left = tot["pending"] + tot["spooled"] + tot["dropped"]
                sec.add(
                    "pending + spooled + dropped at the end",
                    left,
                    "events",
                    "0",
                    passed=left == 0,
                )
                sec.add(
                    "accounting balanced", float(st["balanced"]), "", "1", passed=st["balanced"]
                )
                data_ok &= left == 0 and st["balanced"]
        growth, peak = _rss_growth(done.get("rss", []), args.warmup)
        rss_ok = growth is not None and growth <= 10.0
        sec.add(
            f"RSS growth after {args.warmup:.0f} s (max)",
            growth,
            "%",
            "<= 10 %",
            passed=rss_ok if growth is not None else None,
            note="" if growth is not None else "run too short for the warm-up",
        )
        if peak is not None:
            sec.add("RSS peak", peak / 2**20, "MB")
        hung = guard["killed"] or result["child_exit"] not in (0, None)
        if hung:
            sec.add(
                "experiment finished on its own",
                0.0,
                "",
                guard["reason"] or f"exit {result['child_exit']}",
                passed=False,
            )

        print()
        print(table(sec.figures))
        self._print_poisons(check)
        self._print_log(workdir)
        status = 1 if not data_ok else 2 if hung else 3 if growth is not None and not rss_ok else 0
        result["verdict"] = {"data_ok": data_ok, "hung": hung, "rss_ok": rss_ok, "exit": status}
        result["figures"] = sec.to_json()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(json_safe(result), indent=1, default=str) + "\n")
            progress(f"results in {args.json}")
        if status == 0 and not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            progress(f"kept {workdir} (experiment.log, spool/, server/)")
        return status

    def _print_poisons(self, check: dict[str, Any]) -> None:
        dl = check.get("dead_letters")
        if not dl:
            return
        print("\npoison events:")
        for p in dl["poisons"]:
            reason = f" ({p['reason']})" if p.get("reason") else ""
            at_call = "" if p["at_call"] == "accepted" else f" [{p['at_call'][:100]}]"
            print(f"  {p['elapsed']:>6.1f}s  {p['kind']:<9} {p['outcome']}{reason}{at_call}")
        for r in dl["other_records"]:
            print(f"  other dead letter: {r}")

    def _print_log(self, workdir: Path) -> None:
        """What the library said on stderr: tracebacks and distinct warnings."""
        try:
            lines = (workdir / "experiment.log").read_text(errors="replace").splitlines()
        except OSError:
            return
        tracebacks = sum(1 for x in lines if "Traceback (most recent call last)" in x)
        distinct: dict[str, int] = {}
        for x in lines:
            if x[:4].isdigit():  # a log record: "date time logger message"
                key = x.split(" ", 3)[-1][:160]
            elif _EXC_LINE.match(x.strip(" |+")):  # the last line of a traceback
                key = "raised: " + x.strip(" |+")[:152]
            else:
                continue
            distinct[key] = distinct.get(key, 0) + 1
        print(f"\nexperiment stderr: {len(lines)} lines, {tracebacks} tracebacks")
        for text, n in list(distinct.items())[:15]:
            print(f"  {n:>4} x {text}")


def _tree_cpu(server: Any) -> float:
    """CPU seconds used by the server's descendants (the leader is reaped, so counted)."""
    import psutil

    total = 0.0
    if server.proc is None:
        return total
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(server.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def _delivery_rates(rows: list[dict[str, Any]]) -> list[float]:
    """Delivered metrics per second between consecutive rows."""
    out = []
    for a, b in itertools.pairwise(rows):
        dt = b["elapsed"] - a["elapsed"]
        sa, sb = a["stats"], b["stats"]
        if dt > 0 and "kinds" in sa and "kinds" in sb:
            out.append(
                (sb["kinds"]["metric"]["delivered"] - sa["kinds"]["metric"]["delivered"]) / dt
            )
    return out


def _spooled_steps(spool: Path) -> tuple[dict[str, set[int]], str | None]:
    """The soak metrics still in the spool's segments (key to steps), read frame by frame."""
    out: dict[str, set[int]] = {}
    try:
        from allele.observability.spool.frames import decode_record, iter_frames
        from allele.observability.spool.records import BatchRecord, decode

        for seg in sorted((spool / "segments").glob("*.spool")):
            data = seg.read_bytes()
            for _pos, payload in iter_frames(data, 0):
                if payload is None:
                    continue
                rec = decode(decode_record(payload))
                if isinstance(rec, BatchRecord) and not rec.system:
                    for key, _value, _ts, step in rec.metrics:
                        if str(key).startswith("soak."):
                            out.setdefault(str(key), set()).add(int(step))
    except Exception as exc:  # the figures say the spool could not be read
        return out, f"{type(exc).__name__}: {exc}"
    return out, None


def _rss_growth(samples: list[tuple[float, int]], warmup: float) -> tuple[float | None, int | None]:
    """Largest RSS after ``warmup`` relative to the RSS at ``warmup``, in percent."""
    if not samples:
        return None, None
    peak = max(r for _, r in samples)
    after = [r for t, r in samples if t >= warmup]
    if len(after) < 2:
        return None, peak
    return (max(after) - after[0]) / after[0] * 100.0, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~2 min, kill every 40 s for 10 s")
    parser.add_argument("--minutes", type=float, help="emitting time (default 10)")
    parser.add_argument("--rate", type=int, default=2000, help="metrics/s over 2 threads")
    parser.add_argument("--kill-every", type=float, help="seconds between kills (default 120)")
    parser.add_argument("--down-for", type=float, help="seconds the server stays dead (20)")
    parser.add_argument("--poison-every", type=float, default=10.0, help="0: no poison")
    parser.add_argument(
        "--poisons",
        type=lambda s: [p for p in s.split(",") if p],
        default=list(POISONS),
        help=f"comma-separated, rotated in this order (default {','.join(POISONS)})",
    )
    parser.add_argument("--row-every", type=float, help="seconds between rows (default 30)")
    parser.add_argument("--warmup", type=float, default=60.0, help="RSS baseline time (s)")
    parser.add_argument("--close-timeout", type=float, default=120.0)
    parser.add_argument("--guard-margin", type=float, default=120.0, help="hard deadline slack")
    parser.add_argument("--system-interval", type=float, default=10.0, help="system metrics")
    parser.add_argument("--json", type=Path, help="write every figure and row here")
    parser.add_argument("--workdir", help="keep everything here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    quick = {"minutes": 2.0, "kill_every": 40.0, "down_for": 10.0, "row_every": 15.0}
    full = {"minutes": 10.0, "kill_every": 120.0, "down_for": 20.0, "row_every": 30.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = set(args.poisons) - set(POISONS)
    if unknown or (args.poison_every and not args.poisons):
        parser.error(f"--poisons: choose among {','.join(POISONS)}")
    if args.kill_every and args.down_for >= args.kill_every:
        parser.error("--down-for must be shorter than --kill-every")
    return Harness(args).run()


if __name__ == "__main__":
    sys.exit(main())
