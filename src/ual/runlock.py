"""One writer per run folder: an operating-system lock on RUN/.ual.lock while a command writes there.

Two commands writing one folder at once corrupt it in ways no single command can repair: two `ual score
--score.via batch` each create a batch per shard (every answer paid twice), two `ual train` write one
adapter folder. So every command that writes a run folder (data, score, map, train, eval, report, demo,
ablate, export-data, analyze, batch cancel) holds this lock for as long as it runs; dry runs, --help,
`ual batch status` and reading the outputs take none.

The lock is the kernel's (fcntl.flock on an open file, POSIX: Linux and macOS), not a protocol over plain
files: it belongs to the open file, so a process that dies, even by SIGKILL, releases it at once and the
next command takes it without any stale-lock clean-up. The file holds the holder's pid, host, command
and start time (JSON), written once the lock is taken, so a second writer's one-line error names them;
the holder removes it as it lets go, leaving the folder as it found it.
Within one process the lock is re-entrant (a recipe such as `ual demo` runs every stage on its folder),
and under `accelerate launch` / torchrun only global rank 0 takes it: the launched processes are one writer.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; commands run unlocked there (README, "One writer per run folder")
    fcntl = None

LOCK_NAME = ".ual.lock"
EXIT_LOCKED = 4  # another process writes this run folder: wait for it, or stop it, then run the command again
_HELD: dict[str, list] = {}  # the lock files this process holds: resolved path -> [file descriptor, depth]


class RunFolderLocked(RuntimeError):
    """Another process holds the run folder's lock; the message names it (one line)."""


def command_line() -> str:
    """This process's command, as the user typed it (`ual ...` also when run as `python -m ual.cli`)."""
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name in ("ual", "cli.py", "__main__.py"):
        argv[0] = "ual"
    return shlex.join(argv)[:300]


@contextmanager
def run_folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold `folder`'s lock for the block; RunFolderLocked if another process holds it. Re-entrant within
    a process. A folder that is not there yet is not made here: the command makes it (and then locks it)
    or refuses with its own message."""
    folder = Path(folder)
    path = str((folder / LOCK_NAME).resolve())
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield
        finally:
            _HELD[path][1] -= 1
        return
    if fcntl is None or not folder.is_dir() or os.environ.get("RANK", "0") != "0":
        yield
        return
    fd = _take(path, folder)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command_line(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _HELD[path] = [fd, 1]
    try:
        yield
    finally:
        _HELD[path][1] -= 1
        if _HELD[path][1] == 0:
            del _HELD[path]
            try:  # removed while still held, so the folder is left as it was found
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)  # releases the lock


def _take(path: str, folder: Path) -> int:
    """The lock file's descriptor, locked. A holder removes the file as it lets go, so a lock taken on a file
    that is no longer at `path` is worth nothing: then the new file is opened and locked instead."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder_text(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunFolderLocked(f"{folder} is being written by another process ({holder}); wait for it to "
                                  f"finish or stop it, then run this again (lock: {path})") from None
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        mine = os.fstat(fd)
        if here is not None and (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
            os.ftruncate(fd, 0)  # a killed holder's details go
            return fd
        os.close(fd)


def _holder_text(fd: int) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        return (f"pid {info['pid']} on {info['host']}, `{info['command']}`, since {info['since']}")
    except (OSError, ValueError, TypeError, KeyError):
        return "a process that is just starting or finishing; its details are not written yet"
