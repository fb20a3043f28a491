"""The process-wide ucxx context, shared by every UCX server and client of the process.

ucxx keeps one context per process. We start it in "thread" progress mode with Python futures enabled: a C++
thread progresses UCX and a notifier thread completes asyncio futures on the event loop that was running when
the context was created. That has three consequences this module enforces or repairs:
- all ucxx use of a process must happen on that one event loop (in a Ray async actor: the actor's loop), and
  the first use must happen inside it (`acquire` is called from coroutines, never at import time);
- without Python futures ucxx awaits each request by spinning `asyncio.sleep(0)`, a full core per process;
- the notifier thread is not a daemon: a process that exits without `ucxx.reset()` hangs at exit. `release`
  resets when the last user closes, and an exit hook stops the thread for processes that never close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading

from kv_transfer.errors import TransportError

# ucxx sets UCX_MEMTYPE_CACHE, which UCX >= 1.19 no longer knows and warns about on every start.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

import ucxx  # noqa: E402

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None  # the loop our context is bound to
_num_users = 0
_is_exit_hook_registered = False


def acquire() -> None:
    """Start (or join) the process's ucxx context on the running event loop. Pair with `release`."""
    global _loop, _num_users
    loop = asyncio.get_running_loop()
    with _lock:
        if _num_users == 0 and ucxx.core._ctx is not None and _loop is not None:
            _try_reset()  # left over from an earlier user whose reset failed
        if ucxx.core._ctx is None:
            ucxx.init(progress_mode="thread", enable_python_future=True)
            _loop = loop
            _register_exit_hook()
        elif _loop is None:
            # Someone outside kv_transfer started ucxx; we cannot tell its loop, so trust it is this one.
            logger.info("reusing a ucxx context started outside kv_transfer")
            _loop = loop
        elif _loop is not loop:
            raise TransportError(
                "ucxx is already bound to another event loop of this process; run every UCX server and client "
                "of a process on one event loop"
            )
        _num_users += 1


def release() -> None:
    """One user is done; the last one shuts ucxx down so the process can exit and a later loop can use it."""
    global _num_users
    with _lock:
        _num_users -= 1
        if _num_users == 0:
            _try_reset()


def context():
    """The ucxx application context (ucxx-internal object: worker, recv_with_handle)."""
    return ucxx.core._get_ctx()


def _try_reset() -> None:
    global _loop
    gc.collect()  # drop endpoints kept alive only by reference cycles
    try:
        ucxx.reset()
        _loop = None
    except Exception as error:  # still referenced somewhere: keep the context, stop its thread at least
        logger.warning("ucxx could not be reset (%s); stopping its notifier thread only", error)
        ucxx.stop_notifier_thread()


def _stop_notifier_at_exit() -> None:
    try:
        ucxx.stop_notifier_thread()
    except Exception:  # exiting anyway
        pass


def _register_exit_hook() -> None:
    # threading._register_atexit runs before the interpreter joins non-daemon threads (plain atexit runs
    # after, too late). It is private CPython API, so degrade to nothing if it disappears.
    global _is_exit_hook_registered
    if _is_exit_hook_registered:
        return
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_stop_notifier_at_exit)
            _is_exit_hook_registered = True
        except RuntimeError:  # already shutting down
            pass
