"""The run-folder lock: a live holder is named, a dead one (this host, or another host gone
silent) is taken over, and the lock is released however the holder's block ends."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from bqat import runlock
from bqat.errors import UserError
from bqat.runlock import RunLock, hold_run_folder

from conftest import ROOT

# A holder in its own process: takes the lock, says so, then waits to be killed. argv: run dir,
# the host name it pretends to have ("" = its own), lease seconds, heartbeat seconds.
HOLDER = r"""
import socket, sys, time
if sys.argv[2]:
    socket.gethostname = lambda: sys.argv[2]
from bqat import runlock
runlock.LEASE_SECONDS, runlock.HEARTBEAT_SECONDS = float(sys.argv[3]), float(sys.argv[4])
runlock.RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def start_holder(run_dir, host="", lease=runlock.LEASE_SECONDS, heartbeat=runlock.HEARTBEAT_SECONDS):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), host, str(lease), str(heartbeat)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path, caplog):
    holder = start_holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(UserError) as err:
            RunLock(tmp_path).acquire()
        assert time.monotonic() - start < 1.0  # at once: no waiting on a live holder of this host
        message = str(err.value)
        assert f"run folder {tmp_path} is in use by another run: PID {holder.pid} on this host" in message
        assert f"kill {holder.pid}" in message and "hydra.run.dir=" in message and "\n" not in message
    finally:
        kill(holder)  # as kill -9 would: the lock file stays behind

    assert (tmp_path / "run.lock").is_file()
    with caplog.at_level(logging.INFO, logger="bqat"):
        with pytest.raises(ValueError):
            with hold_run_folder(tmp_path):  # takes over the dead holder's lock
                assert f"PID {holder.pid}" in caplog.text and "no longer runs" in caplog.text
                raise ValueError("the run failed")
    assert not (tmp_path / "run.lock").exists()  # released on the way out of a failing run
    with hold_run_folder(tmp_path):  # and free again
        pass


def test_a_lock_from_another_host_is_taken_over_once_it_stops_being_refreshed(tmp_path, caplog, monkeypatch):
    lease, heartbeat = 1.5, 0.3
    monkeypatch.setattr(runlock, "LEASE_SECONDS", lease)  # every contender must agree on the lease
    monkeypatch.setattr(runlock, "HEARTBEAT_SECONDS", heartbeat)
    holder = start_holder(tmp_path, host="node-b", lease=lease, heartbeat=heartbeat)
    try:
        time.sleep(3 * heartbeat)
        with pytest.raises(UserError, match=f"PID {holder.pid} on host node-b holds .*refreshed 0 s ago") as err:
            RunLock(tmp_path).acquire()  # refreshed a moment ago: alive, refused at once
        assert "is taken over" in str(err.value)
    finally:
        kill(holder)  # node-b is lost: nobody refreshes the lock any more

    stamp = time.time() - 10
    os.utime(tmp_path / "run.lock", (stamp, stamp))
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="bqat"):
        lock = RunLock(tmp_path)
        lock.acquire()  # watches it stay unchanged for a lease, then takes it
    waited = time.monotonic() - start
    lock.release()
    assert lease <= waited < lease + 3
    assert f"PID {holder.pid} on host node-b, has not refreshed it for" in caplog.text
