"""One process per run folder: `<run dir>/run.lock`, held from before the folder is touched to exit.

Two processes in one run folder (a command started twice, a SLURM requeue that overlaps
the old job) would overwrite each other's last.pt, metrics.json and TensorBoard events.
So a run takes the folder's lock first: filelock's `SoftFileLease`, a marker file naming
its holder (PID, host, process start time) that the holder's heartbeat thread refreshes
every HEARTBEAT_SECONDS. A second process finds it held and stops at once with one line
naming the holder.

A lock whose holder is gone is taken over, with a log line saying so:
- same host: the recorded process no longer exists (kill -9, a crash); checked at once;
- another host (a lost node): the marker has not been refreshed for LEASE_SECONDS, as the
  new process observes it on its own clock (so clocks that differ between hosts do not
  matter). When the marker already looks that old, the new process waits up to
  LEASE_SECONDS to see it refreshed: then its holder is alive and the run stops; if it
  stays unchanged, the lock is taken over.

Under torchrun only rank 0 holds the lock and every rank stops alike. A sweep's cells
each hold their own folder's lock (one after another under Hydra's basic launcher).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import SoftFileLease, Timeout

from bqat.errors import UserError

log = logging.getLogger("bqat")

LOCK_NAME = "run.lock"
LEASE_SECONDS = 60.0  # a lock not refreshed this long, by a process on another host, is taken over
HEARTBEAT_SECONDS = 10.0  # how often the holder refreshes it


def this_host() -> str:
    """This host's name as filelock records it (with the PID namespace of a container)."""
    try:
        from filelock._identity import host_name  # not public; the fallback below differs only in containers
    except ImportError:
        import socket

        return socket.gethostname()
    return host_name()


def host_of(record) -> str:
    # filelock appends "?pidns-<id>" to the hostname inside a container's PID namespace.
    return record.hostname.split("?pidns-")[0]


class RunLock:
    """The lock of one run folder. `acquire()` takes it or raises UserError naming the holder."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.lease = SoftFileLease(str(self.path), lease_duration=LEASE_SECONDS, heartbeat_interval=HEARTBEAT_SECONDS,
                                   on_compromise=self._lost)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        before = self.lease.owner  # who held it, to say so when it is taken over
        wait = 0.0
        if before is not None and not self._same_host(before) and self._age() >= 2 * HEARTBEAT_SECONDS:
            wait = LEASE_SECONDS + 2 * HEARTBEAT_SECONDS  # not refreshed lately: see whether it still is
            log.info(f"{self.path} is held by PID {before.pid} on host {host_of(before)} and has not been refreshed "
                     f"for {self._age():.0f} s; waiting up to {wait:.0f} s for a sign of life before taking it over")
        try:
            self.lease.acquire(timeout=wait)
        except Timeout:
            raise UserError(self._held_message()) from None
        if before is not None and before.token != self.lease.token:
            why = "no longer runs" if self._same_host(before) else f"has not refreshed it for {LEASE_SECONDS:.0f} s"
            log.warning(f"took over {self.path}: its holder, PID {before.pid} on host {host_of(before)}, {why} "
                        "(killed or its node lost); this run now owns the folder")

    def release(self) -> None:
        self.lease.release()

    def _same_host(self, record) -> bool:
        return record.hostname == this_host()

    def _age(self) -> float:
        try:
            return max(0.0, time.time() - self.path.stat().st_mtime)
        except OSError:
            return 0.0

    def _held_message(self) -> str:
        holder = self.lease.owner
        run_dir = self.path.parent
        if holder is None:  # released while we looked: a rare race
            return f"run folder {run_dir} was busy a moment ago (its {LOCK_NAME} changed hands); run the command again"
        if self._same_host(holder):
            where, stop = f"this host ({host_of(holder)})", f"stop it (kill {holder.pid}: it saves, then exits)"
            after = ""
        else:
            where, stop = f"host {host_of(holder)}", "stop it"
            after = f"; a lock its holder stopped refreshing for {LEASE_SECONDS:.0f} s (a lost node) is taken over"
        return (f"run folder {run_dir} is in use by another run: PID {holder.pid} on {where} holds {self.path} "
                f"(refreshed {self._age():.0f} s ago); wait for it to finish, {stop}, or run this one in another "
                f"folder (hydra.run.dir=...){after}")

    def _lost(self, compromise) -> None:  # filelock's heartbeat thread
        log.error(f"lost the run folder lock {self.path} ({compromise.reason}): another process may be writing this "
                  "folder now; stop one of them")


@contextmanager
def hold_run_folder(run_dir: str | Path) -> Iterator[None]:
    """Hold `run_dir`'s lock (rank 0 only under torchrun) until the block exits, however it exits."""
    from bqat import dist  # torch: imported only here, so that RunLock alone stays light

    lock = RunLock(run_dir) if dist.is_main() else None
    refused = None
    if lock is not None:
        try:
            lock.acquire()
        except UserError as err:
            refused = str(err)
    refused = dist.from_rank_zero(refused)  # every rank stops alike
    if refused is not None:
        raise UserError(refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
