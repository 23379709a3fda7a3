"""The ways a run stops on purpose, and the one-line message a user sees for an error."""

import errno
import json
import sys


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


def user_message(error: BaseException) -> str | None:
    """One line for an error a user can act on, or None for an unexpected one (a bug: show
    its traceback).

    Args:
      error: the exception that ended the run.
    """
    if isinstance(error, RunStopped):
        return str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f": {error.filename}" if error.filename else ""
        return f"no space left on the device{where}; free some space and rerun to resume"
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
    print(f"error: {message}\n(run with --verbose for the traceback)", file=sys.stderr)
    return 1
