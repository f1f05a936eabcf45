"""Stopping a run: Ctrl-C (SIGINT), SIGTERM and SIGUSR1 stop it at a step boundary, after saving it.

While a training loop runs (`deferred()`, which `engine.fit` enters), a signal only records
itself here. The engine looks after every optimizer step (`requested()`); when one arrived it
finishes that step, saves the run's checkpoint and raises `Preempted`, which
`stop_on_signals` turns into one line and exit code 128 + signal number (the shell's
"killed by a signal": the run did not finish; 130 for Ctrl-C). Re-running the same command
resumes from the checkpoint.

Outside a training loop (building the data, loading or waiting for the partner, writing
metrics.json) there is no step to finish: the signal stops the run at once (`Interrupted`),
with the same line and exit code. So does a second SIGINT or SIGTERM while the first is being
handled (a second Ctrl-C: "now"). Stopping at once never tears a file: every file bqat writes
is written to a temporary name and renamed over the old one (`engine.atomic_write`), so the
last checkpoint written stays whole.

Under torchrun, the agent forwards the signal it receives to every worker, which the terminal
has usually signalled already: a worker then sees two signals at once. So under torchrun a
repeated signal is not "now"; torchrun itself kills the workers if they have not exited 30 s
after it forwarded the signal. The ranks agree on the stop (`requested(distributed=True)`),
so all of them stop after the same step.

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

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
AGAIN_MEANS_NOW = (signal.SIGINT, signal.SIGTERM)  # a second one stops at once

_received: list[int] = []  # signals that arrived while `stop_on_signals` was active
_deferring = False  # inside a training loop that checks `requested()` after every step


class Preempted(Exception):
    """A stop signal arrived; the run stopped at a step boundary (and saved, when it can)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class Interrupted(BaseException):
    """A stop signal that stops the run at once (no step to finish, or a second signal).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way out
    mistakes it for an error of its own.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def requested(distributed: bool = False) -> int | None:
    """The first stop signal received, or None. Cheap: the engine calls it every step.

    `distributed`: agree over the ranks (one small all-reduce): a signal that reached any
    rank stops them all after this same step, so none is left waiting in a collective.
    """
    if distributed:
        from bqat import dist

        agreed = dist.stop_signal_across_ranks(_received[0] if _received else None)
        if agreed is not None and agreed not in _received:
            _received.append(agreed)
    return _received[0] if _received else None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _record(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    name = signal_name(signum)
    if not _deferring:
        raise Interrupted(signum, f"stopped by {name} outside a training step (nothing in progress to save; "
                                  "every file written so far is kept); re-run the same command to go on")
    if _received and signum in AGAIN_MEANS_NOW and not under_torchrun():
        raise Interrupted(signum, f"stopped at once by a second {name}; the checkpoint saved last is kept as it was; "
                                  "re-run the same command to resume from it")
    if signum not in _received:
        _received.append(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """Inside: stop signals wait for the next step boundary (the caller checks `requested()`)."""
    global _deferring
    before, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = before


def submitit_signal() -> int | None:
    """The signal submitit requeues on (its env var, USR2 by default)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)


def _is_python_handler(handler) -> bool:
    return callable(handler) and handler is not signal.default_int_handler


def leave_signals_to_the_main_process(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn
    """DataLoader workers ignore SIGINT and SIGUSR1: the terminal's Ctrl-C reaches the whole
    process group, and a worker that died of it would fail the fetch of the main process,
    which is finishing its step. The main process stops the workers when it exits.

    Not SIGTERM: Python's multiprocessing ends daemon workers with it at exit (a worker that
    ignored it would hang the exit), and torch's own worker handler already exits quietly
    on a SIGTERM from the main process."""
    for s in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Stop on SIGINT/SIGTERM/SIGUSR1 (and submitit's requeue signal) with one line and 128 + signal."""
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
    except (Preempted, Interrupted) as stop:
        restore()
        log.warning(str(stop))
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks (it is the one that saved)
            print(f"bqat-train: {stop}", file=sys.stderr, flush=True)
        handler = previous.get(stop.signum)
        if _is_python_handler(handler):
            handler(stop.signum, None)  # submitit: resubmit the job (it resumes from last.pt) and exit
        sys.exit(128 + stop.signum)
    finally:
        restore()
