"""SIGTERM and SIGINT, routed to a handler while a block runs (a stop request: checkpoint, then stop)."""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals_to(handler):
    """Inside the block, SIGTERM and SIGINT call `handler(signum, frame)`; outside the main thread (where Python
    cannot catch signals) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopRequest:
    """The stop a signal asked for, kept until the trainer acts on it at the end of a step (it may come while the
    run is still being built); a second SIGINT stops at once."""

    def __init__(self):
        self.signal: str | None = None

    def handler(self, signum, _frame) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
