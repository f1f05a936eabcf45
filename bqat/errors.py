"""Errors a user can cause. The entry point turns them into one line and a non-zero exit."""

from __future__ import annotations

import difflib
import errno
import os
import sys
from contextlib import contextmanager
from typing import Iterator

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the command, the config or the files it names; the message says what to do."""


class BadArgument(UserError, ValueError):
    """A bad argument to bqat's Python API (BlockReplacement, make_twin): a ValueError to a
    library user's code, one line from `bqat-train`."""


class WriteError(UserError):
    """Writing a file failed (disk full, quota, I/O error); the previous file at that path is intact."""

    def __init__(self, path, err: OSError, hint: str = ""):
        self.path, self.err = path, err
        name = errno.errorcode.get(err.errno, "") if err.errno else ""
        reason = f"{err.strerror or err}{f' ({name})' if name else ''}"
        # Raised by the atomic writers, which replace a file by renaming a complete copy over
        # it, and by the event writer, which only appends: what was at `path` stays whole.
        super().__init__(f"cannot write {path}: {reason}; what was there before is kept. "
                         f"Free space on that disk (or fix it) and re-run the same command{hint}")


def fail(message: str) -> None:
    """Print the one line and exit with EXIT_USER_ERROR (no traceback)."""
    print(f"bqat-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


GROUP_NOUNS = {"quant": "quantizer", "data": "dataset", "optim": "optimizer config", "trainer": "trainer config"}


def unknown_option(group: str, value: str, options: list[str]) -> str:
    """The line for `group=value` naming no config file of `group`."""
    if group == "bits":
        return (f"bits must be an integer from 2 to 8, got {value!r}; presets: bits={', '.join(options)}, "
                "other widths: bits.w=N bits.a=N")
    close = difflib.get_close_matches(value, options, n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    noun = GROUP_NOUNS.get(group, group)
    return f"unknown {noun} {value!r}{hint}; choose one of: {', '.join(options)} ({group}=<name>)"


def hydra_error_line(err: Exception) -> str:
    """Hydra's multi-line composition errors as one line."""
    from hydra.errors import MissingConfigException

    missing = getattr(err, "missing_cfg_file", None)
    if isinstance(err, MissingConfigException) and missing and "/" in missing and err.options:
        group, _, value = missing.rpartition("/")
        return unknown_option(group, value, list(err.options))
    text = one_line(str(err))
    cause = err.__cause__
    if cause is not None:  # OmegaConf says which key; its "full_key/object_type" lines are noise
        text += f" ({one_line(str(cause).splitlines()[0])})"
    return text


@contextmanager
def one_line_hydra_errors() -> Iterator[None]:
    """Around `hydra.main`: a bad override (unknown group option, key, syntax) exits with one line.

    Hydra prints such errors over several lines with a HYDRA_FULL_ERROR hint and exits 1.
    HYDRA_FULL_ERROR=1 makes it raise them instead, so bqat can print one line; a user
    who set HYDRA_FULL_ERROR=1 themselves gets Hydra's full report unchanged.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield
        return
    from hydra.errors import CompactHydraException

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except CompactHydraException as err:
        fail(hydra_error_line(err))
    except UserError as err:
        fail(str(err))
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
