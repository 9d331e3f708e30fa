"""
The process around the bus: exit, fork and SIGTERM.

- At exit (``atexit``, and multiprocessing's finalizers for pool workers, which leave
  through ``os._exit``), an open ``Observability`` is closed within ``SHUTDOWN_TIMEOUT``.
- In a forked child, the facade rebuilds its lanes, counters, locks and exporter (the
  parent's threads do not exist there) and keeps logging into the same runs.
- A forked child whose SIGTERM is still the default delivers or spools what is pending
  before it dies (``Pool.terminate()`` skips every exit hook).

Hooks hold weak references: an ``Observability`` that is garbage is not kept alive.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = (
    "CHILD_EXIT_TIMEOUT",
    "CHILD_TERM_TIMEOUT",
    "flush_on_sigterm",
    "forget_half_imported_modules",
    "register_process_hooks",
)

#: seconds a forked child may spend delivering when it is terminated (the rest is spooled)
CHILD_TERM_TIMEOUT = 2.0
#: seconds a forked child may spend delivering at a normal exit (the rest is spooled, and
#: replayed by the parent): a pool's workers never hold up ``Pool.join()`` for long
CHILD_EXIT_TIMEOUT = 5.0


def _call(ref: weakref.WeakMethod[Callable[..., Any]], *args: Any) -> None:
    method = ref()
    if method is not None:
        method(*args)


def register_process_hooks(
    owner: object,
    close_at_exit: Callable[[], None],
    after_fork: Callable[[], None],
) -> None:
    """
    Close ``owner`` at exit (also in multiprocessing workers) and call ``after_fork`` in
    a forked child. Both are bound methods of ``owner``, held weakly.
    """
    at_exit = weakref.WeakMethod(close_at_exit)
    in_child = weakref.WeakMethod(after_fork)
    atexit.register(_call, at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: _call(in_child))
    import multiprocessing.util as mp_util

    def mp_after_fork(_owner: object) -> None:
        # In a multiprocessing child (after its finalizer registry was cleared): close at
        # exit. Workers leave through os._exit, which skips atexit, but runs these.
        mp_util.Finalize(None, _call, args=(at_exit,), exitpriority=100)

    mp_util.register_after_fork(owner, mp_after_fork)


def forget_half_imported_modules() -> None:
    """
    A fork while another thread was importing (the exporter imports anyio's backend and
    MLflow lazily) leaves that module half-initialised in the child, where no thread will
    finish it. Drop such modules, and their submodules, so the child's exporter imports
    them afresh (a complete ``mlflow.entities`` kept under a re-imported ``mlflow`` would
    never become its attribute: "module 'mlflow' has no attribute 'entities'").
    """
    half = [
        name
        for name, module in list(sys.modules.items())
        if getattr(getattr(module, "__spec__", None), "_initializing", False)
    ]
    for name in half:
        prefix = name + "."
        for other in [m for m in sys.modules if m == name or m.startswith(prefix)]:
            sys.modules.pop(other, None)


def flush_on_sigterm(terminate: Callable[[], bool]) -> None:
    """
    In a forked child whose SIGTERM is still the default: on SIGTERM, call ``terminate``
    (a bound method, held weakly: deliver or spool within :data:`CHILD_TERM_TIMEOUT`),
    then die of the signal as before; unless ``terminate`` returns False (the process is
    already delivering at exit, with its own deadline, and ends next).
    """
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
    except ValueError:  # not the main thread
        return
    ref = weakref.WeakMethod(terminate)

    def on_term(signum: int, _frame: object) -> None:
        method = ref()
        if method is not None and not method():
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    with contextlib.suppress(ValueError):  # not the main thread of the child
        signal.signal(signal.SIGTERM, on_term)
