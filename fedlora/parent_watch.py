"""Run a command that dies with its parent: ``python -m fedlora.parent_watch PPID COMMAND...``.

The site daemon runs ``flower-supernode`` as a child. Stopping the daemon's process group (a
service manager, ``kill -- -PID``) stops both, but a SIGKILL of the daemon alone (the OOM
killer) would leave the SuperNode running without its worker. On Linux this launcher asks the
kernel to send the command SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``, which
survives ``exec``), checks that the parent is still the expected one (it may have died before
the request), then replaces itself with the command. It is a separate, single-threaded
process because setting this between fork and exec of a multi-threaded parent is unsafe.
Elsewhere it simply runs the command.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m fedlora.parent_watch PARENT_PID COMMAND [ARG...]", file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            error = ctypes.get_errno()
            print(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(error)}", file=sys.stderr)
            return 1
        if os.getppid() != parent:  # the parent died before the request took effect
            return 1
    os.execvp(command[0], command)  # never returns


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
