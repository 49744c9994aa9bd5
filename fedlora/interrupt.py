"""Ctrl-C and SIGTERM during a simulation: stop within seconds, say how to resume, exit 130.

The first SIGINT or SIGTERM mutes the terminal (Flower, Ray and the round tables would
otherwise print tracebacks and progress while the run stops) and raises ``RunInterrupted`` in
the main thread. ``fedlora.simulate`` then takes the write lock (no file is left half-written),
shuts Ray down and removes its scratch folders; the command prints one line naming the last
completed round and the command that resumes it, and leaves with ``os._exit`` because
Flower's threads would otherwise wait for replies that never come. A second signal exits at
once. A signal that was ignored when the command started (a background job's SIGINT) stays
ignored.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from server.rundir import holds_run

EXIT_CODE = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What signal.getsignal returns: a handler, SIG_DFL/SIG_IGN, or None (not set from Python).
_Handler = Callable[[int, FrameType | None], Any] | int | None


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` in Flower or Ray turns it into an error reply or a retry."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Terminal:
    """The terminal's stderr, kept aside while fds 1 and 2 point at /dev/null."""

    fd: int | None = None
    reported: BaseException | None = None

    @classmethod
    def mute(cls) -> None:
        if cls.fd is not None:
            return
        cls.fd = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)

    @classmethod
    def write_line(cls, text: str) -> None:
        os.write(2 if cls.fd is None else cls.fd, (text + "\n").encode())

    @classmethod
    def write_error(cls, exc: BaseException) -> None:
        """An error that ends a stopping command: on the terminal, not in /dev/null (once)."""
        if exc is cls.reported:
            return
        cls.reported = exc
        trace = "".join(traceback.format_exception(exc)).rstrip()
        cls.write_line(f"fedlora: an error while stopping after the signal:\n{trace}")


def _handle(signum: int, frame: FrameType | None) -> None:
    if _Terminal.fd is not None:  # the second signal: leave now, cleaning up nothing
        os._exit(EXIT_CODE)
    _Terminal.mute()
    sys.excepthook = _report_uncaught  # an error that escapes now must not vanish with stderr
    raise RunInterrupted(signum)


def _report_uncaught(kind: type[BaseException], exc: BaseException, trace: Any) -> None:
    _Terminal.write_error(exc)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into ``RunInterrupted``, the second into an exit.

    The previous handlers come back when the block ends normally or with an error; after an
    interruption they stay, so that a second signal during the cleanup still exits at once.
    """
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _handle)
    try:
        yield
    except RunInterrupted:
        raise
    except BaseException as exc:
        if _Terminal.fd is not None:  # interrupted, then something else failed while stopping
            _Terminal.write_error(exc)
        restore_handlers(previous)
        raise
    restore_handlers(previous)


def restore_handlers(previous: dict[signal.Signals, _Handler]) -> None:
    """Put back the handlers ``signal.getsignal`` returned (None: not set from Python)."""
    for signum, handler in previous.items():
        if handler is not None:  # None: not set from Python, nothing to put back
            signal.signal(signum, handler)


def resume_hint(command: Sequence[str], out_dir: Path) -> str:
    """One line: the last round ``out_dir`` recorded and the command that continues the run.

    ``command`` is the interrupted command without ``--resume`` (``fedlora simulate CONFIG
    --out DIR --set ...``). A run folder without a run in it (stopped before its first
    checkpoint) is started again rather than resumed.
    """
    from server.metrics import read_metrics  # imports Flower: only once it is needed

    if not holds_run(out_dir):
        return f"interrupted before the run started; start it again: {shlex.join(command)}"
    rounds = [line["round"] for line in read_metrics(out_dir)]
    done = f"after round {max(rounds)}" if rounds else "before round 0 completed"
    return f"interrupted {done}; resume with: {shlex.join([*command, '--resume'])}"


def exit_interrupted(line: str) -> NoReturn:
    """Print ``line`` on the terminal and exit 130 without waiting for Flower's threads."""
    _Terminal.write_line(line)
    os._exit(EXIT_CODE)
