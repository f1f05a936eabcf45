"""TensorBoard events of a run (tb/), with disk errors as one line.

torch's SummaryWriter hands events to a background thread that writes and flushes them.
When a write fails there (no space, an I/O error), the thread stores the OSError, prints
its traceback through `threading.excepthook` and dies; the error is raised again in the
main thread by the next `add_scalar`, `flush` or `close`. `RunWriter` turns that into a
WriteError naming the event folder, and keeps the thread's traceback off the terminal.
The training loop flushes at every epoch end, so a failure surfaces there at the latest.
Event files only grow: whatever was written before the failure stays readable.
"""

from __future__ import annotations

import threading

from torch.utils.tensorboard import SummaryWriter

from bqat.errors import WriteError

HINT = " (it resumes from the last checkpoint)"


class RunWriter(SummaryWriter):
    """SummaryWriter whose write failures, immediate or from its thread, raise WriteError."""

    def __init__(self, log_dir: str, **kwargs):
        _quiet_writer_threads()
        try:
            super().__init__(log_dir, **kwargs)
        except OSError as err:
            raise WriteError(log_dir, err, HINT) from None

    def add_scalar(self, *args, **kwargs):
        try:
            return super().add_scalar(*args, **kwargs)
        except OSError as err:
            raise WriteError(self.log_dir, err, HINT) from None

    def flush(self):
        try:
            return super().flush()
        except OSError as err:
            raise WriteError(self.log_dir, err, HINT) from None

    def close(self):
        try:
            return super().close()
        except OSError as err:
            raise WriteError(self.log_dir, err, HINT) from None

    def close_quietly(self) -> None:
        """Close on the way out of a run that is already ending with its own message."""
        try:
            super().close()
        except OSError:
            pass


_previous_hook = None


def _quiet_writer_threads() -> None:
    """Drop the traceback of an event writer thread that died of an OSError (re-raised in the main thread)."""
    global _previous_hook
    if _previous_hook is not None:
        return
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another tensorboard: its traceback may show, the one line still ends the run
        return
    _previous_hook = threading.excepthook

    def hook(args) -> None:
        if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
            return
        _previous_hook(args)

    threading.excepthook = hook
