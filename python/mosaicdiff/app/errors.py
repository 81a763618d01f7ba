"""How a command ends: exit statuses and the one-line error message of an exception.

Exit status: 0 success; 2 (`EXIT_USAGE`, as argparse) a bad command line, input file or output
location; 1 (`EXIT_FAILURE`) the run itself failed; 130 (`EXIT_INTERRUPTED`) Ctrl-C.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Errors that mean "the input is wrong" (command line, input files, output location): exit 2.
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError)
_MAX_MESSAGE = 600  # characters of an exception message printed without --debug


class UsageError(Exception):
    """A bad command line, found by the parser or by a check before the work starts (exit 2)."""

    def __init__(self, message: str, prog: str = "mosaicdiff"):
        super().__init__(message)
        self.prog = prog


def one_line(exc: BaseException) -> str:
    """`exc`'s message on one line (whitespace collapsed, long messages cut)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:  # "[Errno 28] ...: 'x'" -> "x: ..."
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + " ... (--debug shows it all)"


def describe_error(exc: Exception) -> tuple[int, str]:
    """(exit status, one-line message) of an exception that ended a command."""
    from safetensors import SafetensorError

    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, SafetensorError):  # a weights or calibration file that is not safetensors
        return EXIT_USAGE, f"not a valid safetensors file: {one_line(exc)}"
    if isinstance(exc, INPUT_ERRORS):
        return EXIT_USAGE, one_line(exc)
    if isinstance(exc, OSError):  # disk full, I/O error, a concurrent save, ...
        return EXIT_FAILURE, one_line(exc)
    return EXIT_FAILURE, f"{type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)"
