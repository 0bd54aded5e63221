"""One run per run directory: a lock that a crash cannot leave stale.

Two runs writing one directory interleave ``metrics.jsonl`` and leave a config beside another run's
model, so a run claims its directory before writing to it. The claim is an ``fcntl.flock`` on
``<run dir>/run.lock``, which the kernel drops when the process dies however it dies (SIGKILL, OOM,
power loss of a local disk), plus the holder's PID, host and start time written in the file for the
message. A lock file whose flock is free was left by a dead process on this host: it is cleared
with a warning. A lock file naming another host cannot be checked from here (flock need not reach
across network file systems), so it is refused with the command that clears it.

The claim is held until ``release`` or the end of the process, and is re-entrant within a process
(an experiment driver may train into a directory it already holds): each ``claim`` needs its
``release``, and the last one gives the directory back.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from trustml.config import ConfigError

if TYPE_CHECKING:  # torch stays unimported for a bare claim (lock-holding helpers, tests)
    from trustml.training.distributed import World

LOCK_NAME = "run.lock"
_HELD: dict[Path, list[int]] = {}  # resolved run dir -> [flocked file descriptor, claims]


def _holder(text: str) -> dict | None:
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict) -> str:
    return f"PID {info.get('pid')} on host {info.get('host')!r} (started {info.get('started')})"


def claim(run_dir: str | Path) -> Path:
    """Take ``run_dir`` for this process (creating it), or raise ConfigError naming the live run
    that holds it. Returns the lock file."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        key = run_dir.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            return key / LOCK_NAME
        fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"run directory {str(run_dir)!r} is not writable: "
                          f"{err.strerror or err}") from None
    path = key / LOCK_NAME
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a live process holds it
        info = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace")) or {}
        os.close(fd)
        raise ConfigError(f"run directory {str(run_dir)!r} is in use by a live run: "
                          f"{_describe(info)}; wait for it to end or choose another "
                          "--run-dir") from None
    host = socket.gethostname()
    info = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    if info and info.get("host") != host:
        os.close(fd)
        raise ConfigError(f"run directory {str(run_dir)!r} is locked by {_describe(info)}, "
                          "another machine, whose process cannot be checked from here; if that "
                          f"run has ended, remove {str(path)!r} and retry")
    if info:
        print(f"warning: cleared the stale lock of {_describe(info)} on {str(run_dir)!r}: that "
              "run ended without releasing it", file=sys.stderr)
    mine = {"pid": os.getpid(), "host": host,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
    except OSError as err:
        os.close(fd)
        raise ConfigError(f"run directory {str(run_dir)!r}: cannot write its lock file "
                          f"({err.strerror or err})") from None
    _HELD[key] = [fd, 1]
    return path


def claim_on_main(run_dir: str | Path, world: World) -> None:
    """Under torchrun rank 0 alone writes, so it alone claims; its refusal is broadcast and raised
    on every rank, so no rank is left waiting for the others in a collective."""
    from trustml.training.distributed import broadcast

    refusal = None
    if world.is_main:
        try:
            claim(run_dir)
        except ConfigError as err:
            refusal = str(err)
    refusal = broadcast(refusal, world)
    if refusal is not None:
        raise ConfigError(refusal)


def release(run_dir: str | Path) -> None:
    """Give ``run_dir`` back: the lock file is emptied (a finished run leaves no holder behind)."""
    key = Path(run_dir).resolve()
    if key not in _HELD:
        return
    _HELD[key][1] -= 1
    if _HELD[key][1] > 0:
        return
    fd = _HELD.pop(key)[0]
    try:
        os.ftruncate(fd, 0)
    except OSError:  # a full or read-only disk: the flock below still goes
        pass
    finally:
        os.close(fd)  # closing the last descriptor drops the flock
