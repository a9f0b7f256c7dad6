"""One writer per run folder: an exclusive lock held while a process trains into it.

Two `zoo train` started in the same second, or two `--resume RUN` at once, would otherwise both write
one folder: interleaved metrics, checkpoints of one run under the other's log. The lock is `flock` on
`RUN/.lock`, which the operating system releases when its process ends, however it ends (kill -9
included), so a crashed run never leaves its folder locked. The file names its holder (pid, host,
start time, command) for the message the next writer gets. flock is local to one machine: on a
network file system shared by several machines the lock may not hold (the docs say so).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path

from zoo.errors import ZooError

LOCK_NAME = ".lock"
_held: dict = {}  # resolved run folder -> the open lock file (held by this process)


class RunBusy(ZooError):
    """Another process is writing this run folder."""


def hold(run_dir) -> None:
    """Take `run_dir`'s lock for this process (again: a no-op), or raise RunBusy naming its holder."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        try:
            who = json.loads(holder)
            who = f"pid {who['pid']} on {who['host']}, since {who['since']}: {who['command']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise RunBusy(f"run folder {run_dir} is being written by {who}; wait for it to end, or train into "
                      "another folder (train.run_name=...)") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "since": datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}))
    f.flush()
    _held[key] = f


def release(run_dir) -> None:
    f = _held.pop(str(Path(run_dir).resolve()), None)
    if f is not None:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def claim_new_run_dir(out_dir, name: str) -> Path:
    """A fresh run folder `out_dir/name` (or name-2, name-3, ...), locked by this process before anyone else can
    write it: two runs started in the same second get two folders."""
    n = 1
    while True:
        run_dir = Path(out_dir) / (name if n == 1 else f"{name}-{n}")
        n += 1
        try:
            hold(run_dir)
        except RunBusy:
            continue
        if any(p.name != LOCK_NAME for p in run_dir.iterdir()):  # a finished or stopped run: not ours to write
            release(run_dir)
            continue
        return run_dir


def abandon(run_dir) -> None:
    """Release a claimed folder and remove it if nothing but its lock was written."""
    run_dir = Path(run_dir)
    release(run_dir)
    if run_dir.is_dir() and all(p.name == LOCK_NAME for p in run_dir.iterdir()):
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
        run_dir.rmdir()
