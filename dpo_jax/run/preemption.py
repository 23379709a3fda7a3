"""SIGTERM and SIGINT turned into a request that the training loop honours at a step boundary.

Schedulers (SLURM, Kubernetes) and TPU preemption send SIGTERM, then SIGKILL after a grace
period; Ctrl-C sends SIGINT. Inside `catch_stop_signals()`, either signal only sets a flag: the
loop finishes the step in flight, saves a checkpoint, and stops with `errors.Preempted`. A second
signal of the same kind while the first is being honoured gets the default behaviour (kill), so a
stuck save can still be interrupted.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Whether a stop signal has arrived, and which (`signal_name`)."""

    def __init__(self):
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)  # a second one kills, as usual


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGINT set the returned request instead of killing.

    Off the main thread (where Python cannot install handlers) the request never fires and
    signals keep their usual effect. The previous handlers are restored on exit.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, request._handle) for sig in _SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
