"""Preemption: SIGTERM and SIGUSR1 stop a run at a step boundary, after saving it.

A signal only records itself here. The engine looks after every optimizer step
(`requested()`); when one arrived it finishes that step, saves the run's checkpoint and
raises `Preempted`, which `stop_on_signals` turns into one line and exit code
128 + signal number (the shell's "killed by a signal": the run did not finish).
Re-running the same command resumes from the checkpoint.

Under Hydra's submitit launcher (SLURM), submitit has already bound its own handler to
its requeue signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise): that handler
calls the launcher's `checkpoint()`, which resubmits the same Hydra job, requeues it and
exits at once, mid-step. bqat defers it like the others: the step finishes, last.pt is
saved, then submitit's handler runs and requeues the job, which resumes from last.pt.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("bqat")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []  # signals that arrived while `stop_on_signals` was active


class Preempted(Exception):
    """A stop signal arrived; the run stopped at a step boundary (and saved, when it can)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def requested() -> int | None:
    """The first stop signal received, or None. Cheap: the engine calls it every step."""
    return _received[0] if _received else None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _record(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    if signum not in _received:
        _received.append(signum)


def submitit_signal() -> int | None:
    """The signal submitit requeues on (its env var, USR2 by default)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)


def _is_python_handler(handler) -> bool:
    return callable(handler) and handler is not signal.default_int_handler


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Defer SIGTERM/SIGUSR1 (and submitit's requeue signal) to the next step boundary."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    signals = list(STOP_SIGNALS)
    requeue = submitit_signal()
    # Only take over submitit's signal when something (submitit) already handles it.
    if requeue is not None and requeue not in signals and _is_python_handler(signal.getsignal(requeue)):
        signals.append(requeue)
    previous = {s: signal.signal(s, _record) for s in signals}
    _received.clear()

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()

    try:
        yield
    except Preempted as stop:
        restore()
        log.warning(str(stop))
        print(f"bqat-train: {stop}", file=sys.stderr, flush=True)
        handler = previous.get(stop.signum)
        if _is_python_handler(handler):
            handler(stop.signum, None)  # submitit: resubmit the job (it resumes from last.pt) and exit
        sys.exit(128 + stop.signum)
    finally:
        restore()
