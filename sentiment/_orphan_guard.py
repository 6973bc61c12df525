"""Run a command that stops when the process that started it dies (Linux).

`sentiment run` starts its children in sessions of their own, so that Ctrl-C
reaches only it and it can stop them in order. Killed outright (SIGKILL, the
OOM killer) it cannot stop them, and a beat left running would keep the beat
lock from the next run. So each child is started through this module, which
asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG, kept
across exec) and then becomes the command:

    python -m sentiment._orphan_guard PARENT_PID PROGRAM [ARGS...]

Where prctl does not exist (not Linux) the command runs unguarded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, command = int(argv[0]), argv[1:]
    with contextlib.suppress(AttributeError):  # no prctl: not Linux
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        sys.exit(f"{command[0]}: not started, its parent {parent} is gone")
    os.execv(command[0], command)  # noqa: S606 - our own children's argv, no shell


if __name__ == "__main__":
    main(sys.argv[1:])
