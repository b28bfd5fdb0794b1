"""The one exception type that user-facing problems raise.

Everything a user can cause (a missing folder, a corrupt file, a bad argument) raises
`NeolmError` with a one-line message; the CLI prints that line and exits non-zero.
Programming errors stay ordinary exceptions with tracebacks.
"""


class NeolmError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""
