"""Stopping a training run cleanly: Ctrl-C or SIGTERM ends it at a step boundary, after a save.

Inside a stage's loop (`deferred_stops`) the first signal is only noted; the loop (core/train_loop.py)
sees `stop_requested()` at its next step, saves the state at that step and raises `Interrupted`. A
second signal stops at once. Outside the loop SIGTERM raises KeyboardInterrupt as Ctrl-C does
(`sigterm_interrupts`), and DataLoader workers ignore both (`ignore_stop_signals`), leaving them to
the main process, which shuts its workers down.
"""
import os
import signal
import threading
from contextlib import contextmanager


def ignore_stop_signals(_worker_id=None):
    """A DataLoader worker's init: leave Ctrl-C and SIGTERM to the main process, which stops the run
    cleanly (`deferred_stops`) and then shuts its workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Interrupted(Exception):
    """A stage stopped by Ctrl-C or SIGTERM after saving its state at `step` (of `total`) in `path`."""

    def __init__(self, stage, step, total, path):
        self.stage, self.step, self.total, self.path = stage, step, total, path
        super().__init__(f"the {stage} stage stopped at step {step} of {total}, saved in {path}")


class _Stops:
    """Stop requests (Ctrl-C, SIGTERM) held until the stage's loop reaches a step boundary."""

    requested = None


@contextmanager
def deferred_stops():
    """Within the block, the first Ctrl-C or SIGTERM is only noted (`_Stops.requested`), for the loop to
    save and stop at its next step boundary; a second one raises KeyboardInterrupt at once. Only in the
    main thread of a single process (under torchrun the ranks would stop at different steps)."""
    if threading.current_thread() is not threading.main_thread() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return

    def note(signum, frame):
        if _Stops.requested is not None:
            raise KeyboardInterrupt
        _Stops.requested = signum

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    _Stops.requested = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _Stops.requested = None


@contextmanager
def sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt in the block, as Ctrl-C does, so a run stopped outside a stage's
    loop ends the same way (temporary files removed, one line)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_requested():
    """Whether a Ctrl-C or SIGTERM came during the current `deferred_stops` block."""
    return _Stops.requested is not None
