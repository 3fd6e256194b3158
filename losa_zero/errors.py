"""User-facing errors.

Anything the user can fix (a bad flag, a missing file, an unsupported model) raises
:class:`LosaZeroError`. The CLI prints it as one line and exits with code 2, so scripts and
schedulers see a clean failure instead of a traceback.
"""


class LosaZeroError(Exception):
    """An error caused by the user's input, reported as one line with exit code 2."""
