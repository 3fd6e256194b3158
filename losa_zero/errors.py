"""User-facing errors.

Anything the user can fix (a bad flag, a missing file, an unsupported model) raises
:class:`LosaZeroError`. The CLI prints it as one line and exits with code 2, so scripts and
schedulers see a clean failure instead of a traceback.
"""
from __future__ import annotations

import argparse
import sys


class LosaZeroError(Exception):
    """An error caused by the user's input, reported as one line with exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's cancel), raised where the signal lands so that it
    unwinds like Ctrl-C: the temporary output is removed and the command exits with 143."""


def raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` (main thread only). A second SIGTERM is
    ignored so that it cannot interrupt the cleanup the first one started."""
    import signal

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)

class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (unknown flag, bad choice, missing value) in the one-line form
    of every other error, exit 2, without the usage block."""

    def error(self, message: str):
        print(f"losa-zero: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
