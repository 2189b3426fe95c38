"""One training process per run folder: the run holds ``<run folder>/run.lock`` while it trains.

The lock file records its holder (host, pid, start time). It is created with
``os.open(O_CREAT | O_EXCL)``, which fails when the file exists, atomically: on a local disk, and on
NFS (v3 and later) shared by the nodes of a cluster, where the server performs the exclusive create.
``fcntl``/``flock`` locks are not used: on many NFS setups they are unsupported, silently local to
one node, or depend on a lock daemon, and a node that dies may keep them for a long time.

A lock whose holder is gone is stale. On the holder's own host that is checked (no process with its
pid, an exited one not yet reaped, or one started at another time) and the lock is taken over with
a note; a holder on another host cannot be checked from here, so the message says so and names the
file to delete.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass

from .utils import log_msg

LOCK_FILE = "run.lock"


class RunFolderLockedError(RuntimeError):
    """Another process holds the run folder; the message names it and the folder."""


def _proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux): [0] the state, [19] the
    start time in clock ticks since boot; [] where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _process_start(pid: int) -> str:
    """When process ``pid`` started ("" where unknown): tells it from a later process given the same pid."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: str  # wall-clock time the lock was taken, for people
    process_start: str = ""  # _process_start(pid) when the lock was taken

    @classmethod
    def this_process(cls) -> "LockHolder":
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), _process_start(os.getpid()))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"

    def is_stale(self) -> bool:
        """Whether the holder is certainly gone: only a holder on this host can be checked."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's process: alive
            pass
        fields = _proc_stat(self.pid)
        if fields and fields[0] == "Z":  # exited, not yet reaped by its parent
            return True
        return bool(self.process_start) and len(fields) > 19 and fields[19] != self.process_start


def lock_path(run_dir: str) -> str:
    return os.path.join(run_dir, LOCK_FILE)


def _read(path: str) -> LockHolder | None:
    """The holder a lock file records; None without the file. A lock being written (or damaged)
    reads as an unknown holder, never as free."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    try:
        return LockHolder(**json.loads(text))
    except (ValueError, TypeError):
        return LockHolder("(unknown: the lock file is being written or is damaged)", 0, "?")


def read_holder(run_dir: str) -> LockHolder | None:
    """The holder recorded in ``run_dir``'s lock; None without a lock."""
    return _read(lock_path(run_dir))


def live_holder(run_dir: str) -> LockHolder | None:
    """Who runs in ``run_dir`` now: its lock's holder unless there is none or it is stale."""
    holder = read_holder(run_dir)
    return None if holder is None or holder.is_stale() else holder


def locked_message(run_dir: str, holder: LockHolder) -> str:
    message = (f"run folder {run_dir} is in use by another training process: {holder.describe()} "
               f"(lock file {lock_path(run_dir)}). Wait for it to finish, or stop it first")
    if holder.host != socket.gethostname():
        message += (f"; its host is not this one ({socket.gethostname()}), so whether it still runs cannot be "
                    f"checked from here: if no such process runs on {holder.host}, delete the lock file")
    return message


def _take_over(run_dir: str, stale: LockHolder) -> None:
    """Move the stale lock aside (a rename: of two processes only one moves it) and drop it."""
    path = lock_path(run_dir)
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process took it over first
        return
    moved = _read(aside)
    if moved != stale:  # a fresh lock taken in between: put it back, it is not ours to drop
        os.rename(aside, path)
        return
    os.remove(aside)
    print(log_msg(f"Took over the lock of {run_dir} from {stale.describe()}: that process no longer exists",
                  "INFO"), flush=True)


@dataclass(frozen=True)
class HeldLock:
    """A run folder's lock held by this process; ``release()`` drops it."""

    run_dir: str
    holder: LockHolder
    created: tuple[str, ...]  # the folders taking the lock made, deepest first

    def release(self) -> None:
        """Drop the lock if this process still holds it, and the folders the lock made if they
        stayed empty: a run stopped before training leaves no trace."""
        if read_holder(self.run_dir) == self.holder:
            os.remove(lock_path(self.run_dir))
        for folder in self.created:
            try:
                os.rmdir(folder)
            except OSError:  # the run wrote into it
                break


def _missing_folders(path: str) -> tuple[str, ...]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    return tuple(missing)


def acquire(run_dir: str) -> HeldLock:
    """Take ``run_dir``'s lock for this process (creating the folder); raises
    ``RunFolderLockedError`` naming the holder when another live process has it."""
    created = _missing_folders(os.path.abspath(run_dir))
    os.makedirs(run_dir, exist_ok=True)
    me = LockHolder.this_process()
    for _ in range(5):
        try:
            fd = os.open(lock_path(run_dir), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(run_dir)
            if holder is not None and not holder.is_stale():
                raise RunFolderLockedError(locked_message(run_dir, holder)) from None
            if holder is not None:
                _take_over(run_dir, holder)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(me)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return HeldLock(run_dir, me, created)
    raise RunFolderLockedError(f"run folder {run_dir}: other processes keep taking its lock {lock_path(run_dir)}")
