"""The ways a run stops on purpose, and the one-line message a user sees for an error."""

import atexit
import contextlib
import errno
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator


class RunStopped(Exception):
    """A run that stopped before its last step, on purpose (see the subclasses)."""


class Diverged(RunStopped):
    """A step's loss, gradient norm or params were not finite (or too many steps were skipped);
    the non-finite update was not applied, and nothing non-finite was written."""


class ReferenceMismatch(RunStopped):
    """At step 1 the policy, which should be its own reference, scored differently from it."""


class Preempted(RunStopped):
    """SIGTERM or SIGINT arrived: a checkpoint was saved at the step boundary that followed."""


class NonFiniteParams(ValueError):
    """Params about to be written, or just loaded, hold NaN or infinity (the tensors named)."""


# Errors that come from what the user gave (a config, a file, a path), shown as one line.
_USER_ERRORS = (ValueError, TypeError, KeyError, OSError, RecursionError)
# A write the filesystem refused for room, by errno: what the user reads.
_NO_ROOM = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space"),
    errno.EFBIG: ("file too large for the file-size limit (ulimit -f)", "raise the limit"),
}
# tensorstore (orbax's array writes): ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']").
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


def no_room_errno(error: BaseException) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when `error` is a write the filesystem refused for room (an
    OSError, or tensorstore's ValueError carrying the code), else None."""
    code = error.errno if isinstance(error, OSError) else None
    if isinstance(error, ValueError):
        match = _OS_ERROR_CODE.search(str(error))
        code = int(match.group(1)) if match else None
    return code if code in _NO_ROOM else None


@contextlib.contextmanager
def naming_full_disk(path: str) -> Iterator[None]:
    """Re-raises a write refused for room that names no file (orbax's, tensorstore's, a flush's)
    as an OSError naming `path`, the directory being written."""
    try:
        yield
    except (OSError, ValueError) as error:
        code = no_room_errno(error)
        if code is None or getattr(error, "filename", None):
            raise
        raise OSError(code, os.strerror(code), os.fspath(path)) from error


# Failure reports printed outside the main thread, held by `hold_background_reports`: each entry
# prints one when called. None once a one-line error has been reported (later ones are dropped).
_held: list | None = []


def hold_background_reports() -> None:
    """Holds, until the process exits, the failure reports that libraries print outside the main
    thread: orbax's, gcsfs's and asyncio's ERROR logs (a failed write's future that no one
    awaited once another failed), exceptions Python can only report as unraisable
    (tensorstore's callbacks into a closed event loop, a failing atexit callback) and threads
    that die.

    A full disk makes each of these repeat, with its traceback, the error that the main thread
    then raises. If the run ends in a one-line error (`report`), they are dropped; otherwise they
    are printed at exit. The main job calls this unless --verbose.
    """

    class HoldLibraryErrors(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
            # gcsfs logs each request it gives up on, with its traceback, before raising it
            from_library = from_orbax or record.name in ("asyncio", "gcsfs")
            if record.levelno < logging.ERROR or not from_library:
                return True
            _hold(lambda: logging.getLogger(record.name).handle(record))
            return False

    hold = HoldLibraryErrors()
    for handler in logging.getLogger().handlers:  # absl's handler, and any other
        handler.addFilter(hold)
    unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = lambda args: _hold(lambda: unraisable_hook(args))
    threading.excepthook = lambda args: _hold(lambda: thread_hook(args))

    def release() -> None:
        if _held is None:  # reported in one line: keep dropping what the exit brings
            return
        for handler in logging.getLogger().handlers:
            handler.removeFilter(hold)
        sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook
        for emit in _held:
            emit()

    atexit.register(release)  # atexit runs last-in first-out: after later libraries' callbacks


def _hold(emit) -> None:
    if _held is not None:
        _held.append(emit)


def user_message(error: BaseException) -> str | None:
    """One line for an error a user can act on, or None for an unexpected one (a bug: show
    its traceback).

    Args:
      error: the exception that ended the run.
    """
    if isinstance(error, RunStopped):
        return str(error)
    code = no_room_errno(error)
    if code is not None:
        what, remedy = _NO_ROOM[code]
        where = f": {error.filename}" if getattr(error, "filename", None) else ""
        return f"{what}{where}; {remedy} and rerun to resume"
    if isinstance(error, json.JSONDecodeError):
        return f"malformed JSON: {error}"
    if type(error).__module__.startswith("jinja2"):
        return f"chat template: {type(error).__name__}: {error}"
    if isinstance(error, RecursionError):
        return f"recursion too deep ({error}); a chat template that calls itself?"
    if isinstance(error, _USER_ERRORS):
        text = str(error) if not isinstance(error, KeyError) else f"missing key {error}"
        return f"{type(error).__name__}: {text}" if not isinstance(error, ValueError) else text
    return None


def report(error: BaseException, *, verbose: bool) -> int:
    """Prints what ended a run as the user should see it, and returns the exit code.

    Preempted: its message, exit 0 (the checkpoint is saved; rerun to resume). An error the
    user can act on: one line, exit 1 (with `verbose`, the traceback instead). Anything else is
    re-raised, so a bug shows its traceback.
    """
    if isinstance(error, Preempted):
        print(error, file=sys.stderr)
        return 0
    message = user_message(error)
    if message is None or verbose:
        raise error
    global _held
    _held = None  # the same failure, told again by the libraries' threads and exit callbacks
    print(f"error: {message}\n(run with --verbose for the traceback)", file=sys.stderr)
    return 1
