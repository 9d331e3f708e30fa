"""
Secrets and local files (issue 9, item 8).

- A password or token in the tracking URI appears nowhere: not in the delivery worker's
  argv (``/proc/<pid>/cmdline``), not in ``str``/``repr`` of the settings, of the backends
  or of the readers, not in log records, error messages or the CLI's output.
- Every file the library writes is 0600 and every folder level it creates 0700, under a
  permissive umask.
- A spool that belongs to another user, or that others may write, is not replayed.
- Replay uploads artifacts only from the spool's own copies.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner

from allele.observability import Observability, Queries
from allele.observability.backends.base import DeliveryError
from allele.observability.backends.factory import make_backend
from allele.observability.backends.process import ProcessBackend
from allele.observability.cli import main
from allele.observability.config import ConfigError, Settings, load_settings, redact
from allele.observability.genomes.reader import GenomeReader
from allele.observability.sinks.deadletter import DeadLetters
from allele.observability.spool.records import ArtifactRecord, EndRecord, RunRecord, encode
from allele.observability.spool.replay import Replayer
from allele.observability.spool.runmap import RunMap
from allele.observability.spool.safety import ARTIFACTS
from allele.observability.spool.segments import REPLAYED, SEGMENTS, Spool
from servers import MlflowServer, free_port

SECRET = "S3cr3t-hunter2-xyzzy"
WORKER_MODULE = "allele.observability.backends.process"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _leaks(*texts: object) -> list[str]:
    return [str(t) for t in texts if SECRET in str(t)]


@pytest.fixture(name="permissive_umask")
def _permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- redaction -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"https://{SECRET}@mlflow.example.com/api", "https://***@mlflow.example.com/api"),
        (f"https://bob:{SECRET}@h:5000", "https://bob:***@h:5000"),
        (f"postgresql://bob:{SECRET}@db/mlflow", "postgresql://bob:***@db/mlflow"),
        (f"sqlite:////tmp/m.db?password={SECRET}", "sqlite:////tmp/m.db?password=***"),
        (f"http://h/x?a=1&token={SECRET}&b=2", "http://h/x?a=1&token=***&b=2"),
        (f"host=db user=u password={SECRET} dbname=m", "host=db user=u password=*** dbname=m"),
        (f"Authorization: Bearer {SECRET}", "Authorization: Bearer ***"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("metric key=loss at step=3 by a@b.org", "metric key=loss at step=3 by a@b.org"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    """Credentials in URIs, query parameters and auth headers are hidden, nothing else."""
    assert shown == redact(text)
    assert shown == redact(shown)  # idempotent


# -- secrets -------------------------------------------------------------------------------
def _workers() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if WORKER_MODULE in cmdline:
            found.append(child)
    return found


def test_a_password_in_a_sqlite_uri_shows_nowhere(
    template_db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """
    A database URI with a password-like query parameter, delivered by the worker process:
    the data arrives, and the secret is in no argv, str, repr, log record or error.
    """
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}?password={SECRET}"
    obs = Observability.from_env(
        tracking_uri=uri, delivery_process=True, artifact_location=str(tmp_path / "art")
    )
    try:
        with obs.run("secretive", experiment="secrets"):
            obs.metric("fitness", 1.5, step=0)
        assert obs.flush(timeout=120)
        workers = _workers()
        assert workers, "the delivery worker is running"
        argv = [Path(f"/proc/{w.pid}/cmdline").read_bytes() for w in workers]
        backend = make_backend(obs.settings)
        texts = [
            str(obs.settings),
            repr(obs.settings),
            f"{obs.settings}",
            repr(obs),
            repr(backend),
            repr(Queries(uri)),
            repr(GenomeReader(uri)),
            obs.settings.redacted(),
        ]
        backend.close()
    finally:
        obs.close(timeout=30)
    assert [] == [a for a in argv if SECRET.encode() in a]
    assert [] == _leaks(*texts)
    assert "password=***" in repr(obs.settings)
    assert [] == _leaks(*(r.getMessage() for r in caplog.records), caplog.text)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("secrets")
    assert exp is not None
    [run] = client.search_runs([exp.experiment_id])
    assert {"fitness": 1.5} == run.data.metrics  # the worker got the URI over its pipe


def test_store_errors_and_config_errors_hide_the_secret() -> None:
    """MLflow quotes the URI in its error; the DeliveryError (from the worker) does not."""
    backend = ProcessBackend(f"foo://bob:{SECRET}@nowhere/x", timeout=60)
    try:
        with pytest.raises(DeliveryError) as caught:
            backend.ensure_experiment("e", None)
    finally:
        backend.close()
    assert "foo://bob:***@nowhere/x" in caught.value.message  # the message is still useful
    with pytest.raises(ConfigError) as config_error:
        load_settings(tracking_uri=f"ftp://bob:{SECRET}@h/x")
    with pytest.raises(ValueError, match="unsupported URI scheme") as validation_error:
        Settings(tracking_uri=f"ftp://bob:{SECRET}@h/x")
    assert [] == _leaks(caught.value, caught.value.message, config_error.value)
    assert [] == _leaks(validation_error.value)


def test_cli_errors_from_mlflow_are_redacted(store_uri: str) -> None:
    """MLflow's error quotes the registry URI it refuses; the CLI's line does not."""
    registry = f"foo://bob:{SECRET}@nowhere/x"
    result = CliRunner().invoke(
        main,
        ["genomes", "list", "g", "--tracking-uri", store_uri, "--registry-uri", registry],
    )
    assert 1 == result.exit_code, result.output
    assert "MLflow failed" in result.output
    assert "foo://bob:***@nowhere/x" in result.output
    assert [] == _leaks(result.output)


def _fail(message: str) -> None:
    raise RuntimeError(message)


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    """Whatever the library logs goes through redact(), traceback text included."""
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("allele.observability")
    log.warning("cannot reach %s", f"http://bob:{SECRET}@h:5000")
    try:
        _fail(f"connect to postgresql://bob:{SECRET}@db/m failed")
    except RuntimeError:
        log.exception("store error")
    assert 2 == len(caplog.records)
    assert [] == _leaks(caplog.text, *(r.getMessage() for r in caplog.records))
    assert "http://bob:***@h:5000" in caplog.text
    assert "postgresql://bob:***@db/m" in caplog.text


def test_a_password_in_an_http_uri_shows_nowhere(
    mlflow_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """
    ``http://user:pass@host`` against a real server (which ignores the credentials): the
    data arrives; the secret is in no str, repr, log record, or CLI output.
    """
    caplog.set_level(logging.DEBUG)
    host = mlflow_server.url.removeprefix("http://")
    uri = f"http://alice:{SECRET}@{host}"
    obs = Observability.from_env(tracking_uri=uri, experiment_prefix="sec_")
    try:
        with obs.run("over-http", experiment="e"):
            obs.metric("fitness", 2.5, step=0)
        assert obs.flush(timeout=60)
        backend = make_backend(obs.settings)
        texts = [str(obs.settings), repr(obs.settings), repr(obs), repr(backend)]
        texts += [repr(Queries(uri)), repr(GenomeReader(uri))]
        backend.close()
    finally:
        obs.close(timeout=30)
    (tmp_path / "empty-spool").mkdir()
    cli = CliRunner().invoke(
        main,
        ["spool", "replay", "--tracking-uri", uri, "--spool-dir", str(tmp_path / "empty-spool")],
    )
    assert 0 == cli.exit_code, cli.output
    assert "alice:***@" in cli.output
    assert [] == _leaks(*texts, cli.output)
    assert [] == _leaks(*(r.getMessage() for r in caplog.records), caplog.text)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp = client.get_experiment_by_name("sec_e")
    assert exp is not None
    [run] = client.search_runs([exp.experiment_id])
    assert {"fitness": 2.5} == run.data.metrics


# -- file modes ----------------------------------------------------------------------------
@pytest.mark.usefixtures("permissive_umask")
def test_spool_files_are_private_at_every_level(tmp_path: Path) -> None:
    """Under umask 0: segments, offsets, replayed segments, run map and dead letters."""
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    spool_dir = existing / "made" / "by" / "us" / "spool"
    spool = Spool(spool_dir)
    for i in range(3):
        assert spool.append({"i": i})
    spool.close()
    [segment] = list((spool_dir / SEGMENTS).iterdir())
    assert 0o600 == _mode(segment)
    claim = next(spool.claim())
    first = next(claim.records())[0]
    claim.release(first + 1)
    sidecar = segment.with_name(segment.name + ".offset")
    assert 0o600 == _mode(sidecar)
    claim = next(spool.claim())
    claim.done()
    replayed = spool_dir / REPLAYED / segment.name
    RunMap(spool_dir).put("key", "run-id")
    dead = DeadLetters(tmp_path / "dead" / "letters")
    dead.append({"kind": "metric", "reason": "rejected"})
    folders = [existing / "made", existing / "made" / "by", existing / "made" / "by" / "us"]
    folders += [spool_dir, spool_dir / SEGMENTS, spool_dir / REPLAYED]
    folders += [tmp_path / "dead", tmp_path / "dead" / "letters"]
    assert {str(f): 0o700 for f in folders} == {str(f): _mode(f) for f in folders}
    files = [replayed, spool_dir / "runs.jsonl", dead.path]
    assert {str(f): 0o600 for f in files} == {str(f): _mode(f) for f in files}
    assert 0o755 == _mode(existing)  # a parent that existed is left as it was


@pytest.mark.usefixtures("permissive_umask")
def test_chunks_and_tracebacks_are_private(
    make_obs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under umask 0: alert and phase chunks written for upload, a failed run's traceback."""
    from allele.observability.exporter import delivery

    monkeypatch.setattr(delivery, "_unlink", lambda path: None)  # keep chunks to look at
    spool_dir = tmp_path / "deep" / "spool"
    obs = make_obs(spool_dir=spool_dir)
    with pytest.raises(ZeroDivisionError), obs.run("fails", experiment="e"):
        obs.alert("stuck", severity="warning")
        with obs.phase("evaluate"):
            pass
        1 / 0  # noqa: B018
    assert obs.flush(timeout=30)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".txt")]
    # one chunk per delivery round: the alert and run.failed may come in one or two
    assert {"alerts", "phases", "traceback.txt"} == {p.name.split("-")[0] for p in written}
    folders = {f for p in written for f in p.parents if f.is_relative_to(tmp_path / "deep")}
    assert len(folders) >= 5  # deep, spool, annotations, <run key>, tracebacks, ...
    modes = {str(p): _mode(p) for p in [*written, *folders]}
    expected = {str(p): 0o600 for p in written} | {str(f): 0o700 for f in folders}
    assert expected == modes


# -- refusing untrusted spools -------------------------------------------------------------
def _spool_with_a_run(spool_dir: Path) -> Path:
    """A spool holding one run record and its end; returns the segment."""
    spool = Spool(spool_dir)
    spool.append(encode(RunRecord("inst", "k-refused", "refused", None, "r", 1, {}, None, None)))
    spool.append(encode(EndRecord("inst", "k-refused", "refused", None, "FINISHED", 2, [])))
    spool.close()
    [segment] = list((spool_dir / SEGMENTS).iterdir())
    return segment


def _replay(spool_dir: Path, store_uri: str) -> Any:
    settings = load_settings(tracking_uri=store_uri, delivery_process=False)
    backend = make_backend(settings)
    try:
        replayer = Replayer(Spool(spool_dir), backend, RunMap(spool_dir), DeadLetters(spool_dir))
        return replayer.replay(max_records=None)
    finally:
        backend.close()


@pytest.mark.parametrize("what", ["directory 0777", "segment 0666", "owned by nobody"])
def test_an_untrusted_spool_is_not_replayed(
    what: str, tmp_path: Path, store_uri: str, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused with one clear warning, nothing counted as replayed, left in place."""
    spool_dir = tmp_path / "untrusted"
    segment = _spool_with_a_run(spool_dir)
    if what == "directory 0777":
        os.chmod(spool_dir, 0o777)
        path, reason = spool_dir, "group or others may write it (mode 0777"
    elif what == "segment 0666":
        os.chmod(segment, 0o666)
        path, reason = segment, "group or others may write it (mode 0666"
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        nobody = 65534
        os.chown(segment, nobody, nobody)
        path, reason = segment, f"it belongs to uid {nobody}, not to this user"
    caplog.set_level(logging.WARNING, logger="allele.observability")

    first = _replay(spool_dir, store_uri)
    second = _replay(spool_dir, store_uri)

    assert (0, 0, 0, None) == (first.records, first.segments, first.dead_lettered, first.error)
    assert (0, 0) == (second.records, second.segments)
    warnings = [r.getMessage() for r in caplog.records if "not replaying spool" in r.getMessage()]
    assert 1 == len(warnings), warnings  # once per path, however often replay looks
    assert f"not replaying spool {path}: {reason}" in warnings[0]
    assert segment.exists()
    assert client.get_experiment_by_name("refused") is None
    assert ["refused"] == [s.state for s in Spool.inspect(spool_dir)]
    cli = CliRunner().invoke(
        main, ["spool", "replay", "--tracking-uri", store_uri, "--spool-dir", str(spool_dir)]
    )
    assert 1 == cli.exit_code, cli.output
    assert f"refused: {path}: {reason}" in cli.output
    assert segment.exists()


def test_a_trusted_spool_still_replays(tmp_path: Path, store_uri: str, client: Any) -> None:
    """The control case: the same spool, private, is replayed."""
    spool_dir = tmp_path / "trusted"
    _spool_with_a_run(spool_dir)
    report = _replay(spool_dir, store_uri)
    assert (2, 1, None) == (report.records, report.segments, report.error)
    exp = client.get_experiment_by_name("refused")
    assert ["FINISHED"] == [r.info.status for r in client.search_runs([exp.experiment_id])]


# -- artifacts only from the spool's own copies -------------------------------------------
def test_a_crafted_artifact_record_is_dead_lettered(
    tmp_path: Path, store_uri: str, client: Any
) -> None:
    """A record naming /etc/passwd: nothing uploaded, one dead letter with the reason."""
    spool_dir = tmp_path / "crafted"
    spool = Spool(spool_dir)
    spool.append(encode(RunRecord("inst", "k-art", "crafted", None, "r", 1, {}, None, None)))
    spool.append(encode(ArtifactRecord("inst", "k-art", "crafted", None, "/etc/passwd", None)))
    escape = str(spool_dir / ARTIFACTS / ".." / ".." / "outside.txt")
    (tmp_path / "outside.txt").write_text("not the spool's")
    spool.append(encode(ArtifactRecord("inst", "k-art", "crafted", None, escape, None)))
    spool.close()

    report = _replay(spool_dir, store_uri)

    assert (1, 2, None) == (report.records, report.dead_lettered, report.error)
    [run] = client.search_runs([client.get_experiment_by_name("crafted").experiment_id])
    assert [] == client.list_artifacts(run.info.run_id)
    dead = DeadLetters(spool_dir).read()
    assert [("artifact", "rejected")] * 2 == [(d["kind"], d["reason"]) for d in dead]
    assert (
        "artifact path /etc/passwd is not one of this spool's artifact copies"
        in (dead[0]["message"])
    )
    assert "replay uploads nothing from outside the spool" in dead[1]["message"]


def test_a_spooled_artifact_is_uploaded_from_the_spool_copy(
    tmp_path: Path, store_uri: str, client: Any
) -> None:
    """
    An artifact spooled while the store is down is copied into the spool: replay uploads
    the copy (the original may be gone by then) and deletes it afterwards.
    """
    spool_dir = tmp_path / "spool"
    report = tmp_path / "report.txt"
    report.write_text("the report")
    down = f"http://127.0.0.1:{free_port()}"
    obs = Observability.from_env(
        tracking_uri=down,
        spool_dir=spool_dir,
        export_timeout=1,
        artifact_location=str(tmp_path / "art"),
    )
    with obs.run("spooled", experiment="spooled-artifact"):
        obs.artifact(report, "reports")
    obs.close(timeout=1)
    assert 1 == obs.stats().artifact.spooled
    copies = list((spool_dir / ARTIFACTS).rglob("report.txt"))
    assert 1 == len(copies)
    report.unlink()  # the user's file is gone before the replay

    cli = CliRunner().invoke(
        main, ["spool", "replay", "--tracking-uri", store_uri, "--spool-dir", str(spool_dir)]
    )

    assert 0 == cli.exit_code, cli.output
    assert "0 dead-lettered" in cli.output
    [run] = client.search_runs([client.get_experiment_by_name("spooled-artifact").experiment_id])
    assert ["reports/report.txt"] == [
        a.path for a in client.list_artifacts(run.info.run_id, "reports")
    ]
    local = client.download_artifacts(run.info.run_id, "reports/report.txt", str(tmp_path))
    assert "the report" == Path(local).read_text()
    assert [] == list((spool_dir / ARTIFACTS).iterdir())  # the copy is gone once uploaded
