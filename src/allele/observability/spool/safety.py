"""
What replay trusts: a spool of this user's alone, and artifact files of its own.

A spool is replayed into the tracking store with the replaying user's credentials, so its
records must come from that user. Replay refuses (and leaves in place) a spool directory,
its ``segments/`` folder or a segment that belongs to another user or that group or others
may write: one warning per path names it and the reason, and nothing of it counts as
replayed. ``allele-obs spool status`` shows such segments as ``refused`` and
``allele-obs spool replay`` lists them.

Artifacts: when an artifact event is spooled, the file (or folder) is copied into
``<spool>/artifacts/<id>/<name>`` (a hard link when the file system allows, else a copy),
and the record names the copy. Replay uploads an artifact only from there: a record that
names any other path (``/etc/passwd``, a user's key) is dead-lettered with the reason, never
uploaded. A copy is deleted once uploaded; retention prunes copies left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import threading
import uuid
from pathlib import Path

from .._core.files import private_dir
from ..backends.base import DeliveryError

__all__ = (
    "ARTIFACTS",
    "check_artifact",
    "discard_artifact",
    "refusal",
    "refused_paths",
    "stash_artifact",
    "warn_refused",
)

ARTIFACTS = "artifacts"
logger = logging.getLogger("allele.observability")
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _after_fork() -> None:
    global _warned_lock  # noqa: PLW0603 - a lock a forked child may inherit held
    _warned_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def refusal(info: os.stat_result) -> str | None:
    """Why a spool file or folder with this ``stat`` must not be replayed, or None."""
    if info.st_uid != os.geteuid():
        return f"it belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group or others may write it (mode {mode:04o}; expected 0700 or 0600)"
    return None


def _path_refusal(path: Path) -> str | None:
    try:
        return refusal(os.stat(path))
    except FileNotFoundError:
        return None


def folder_refusal(directory: Path, segments: Path) -> tuple[Path, str] | None:
    """The first of the spool directory and its ``segments/`` folder that is refused."""
    for folder in (directory, segments):
        reason = _path_refusal(folder)
        if reason is not None:
            return folder, reason
    return None


def warn_refused(path: Path, reason: str) -> None:
    """Log, once per path and reason in this process, that a spool path is not replayed."""
    key = (str(path), reason)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(
        "allele-observability: not replaying spool %s: %s; it is left in place "
        "(fix its owner or mode, e.g. chmod go-w, to replay it)",
        path,
        reason,
    )


def refused_paths(directory: Path, segments: Path, files: list[Path]) -> list[tuple[Path, str]]:
    """Every refused path among the spool folders and the segment ``files``, with why."""
    folder = folder_refusal(directory, segments)
    if folder is not None:
        return [folder]
    found = []
    for path in files:
        reason = _path_refusal(path)
        if reason is not None:
            found.append((path, reason))
    return found


# -- artifacts ----------------------------------------------------------------------------
def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)  # keeps the file's mode; the 0700 folder keeps it private
    except OSError:
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o600)
    return dst


def stash_artifact(directory: Path, path: str) -> str:
    """
    Copy an artifact into ``<directory>/artifacts/<id>/``; return the copy's path.

    Raises:
        DeliveryError: reason ``local_file``, not retryable: it cannot be copied (gone,
            unreadable, disk full). Replay uploads only the spool's copies, so the caller
            dead-letters the artifact now, with this reason.
    """
    source = Path(path)
    target = Path(directory) / ARTIFACTS / uuid.uuid4().hex / (source.name or "artifact")
    try:
        private_dir(target.parent)
        if source.is_dir():
            shutil.copytree(source, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(source), str(target))
    except (OSError, shutil.Error) as exc:
        with contextlib.suppress(OSError):
            shutil.rmtree(target.parent)
        msg = f"cannot copy the artifact's local file into the spool: {type(exc).__name__}: {exc}"
        raise DeliveryError("local_file", msg, retryable=False) from exc
    return str(target)


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def check_artifact(directory: Path, path: str) -> None:
    """
    Raise a non-retryable :class:`DeliveryError` unless ``path`` is one of the spool's own
    artifact copies (``<directory>/artifacts/<id>/...``, symlinks resolved) and exists.
    """
    folder = Path(os.path.realpath(Path(directory) / ARTIFACTS))
    real = Path(os.path.realpath(path))
    if not _inside(real, folder) or len(real.relative_to(folder).parts) < 2:
        msg = (
            f"artifact path {path} is not one of this spool's artifact copies (in {folder}); "
            "replay uploads nothing from outside the spool, so it was not uploaded"
        )
        raise DeliveryError("rejected", msg, retryable=False)
    if not os.path.lexists(path):
        msg = (
            f"artifact copy {path} is gone (uploaded before an interrupted replay, "
            "or pruned by retention)"
        )
        raise DeliveryError("local_file", msg, retryable=False)


def discard_artifact(directory: Path, path: str) -> None:
    """Delete an uploaded artifact copy (its ``<id>`` folder); anything else is left."""
    folder = Path(os.path.realpath(Path(directory) / ARTIFACTS))
    real = Path(os.path.realpath(path))
    if _inside(real, folder) and len(real.relative_to(folder).parts) >= 2:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder / real.relative_to(folder).parts[0])
