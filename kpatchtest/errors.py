"""Errors that end a command with a documented exit code and one clear line.

Exit codes (README "Exit codes"): 0 the run completed, 1 a gate failed,
2 usage or input error, 3 internal error (a bug: please report it).
"""

EXIT_OK = 0
EXIT_GATE = 1
EXIT_INPUT = 2
EXIT_INTERNAL = 3


class KpatchtestError(Exception):
    """A user-facing failure: printed as one line, no traceback."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class InputError(KpatchtestError):
    """Bad spec, bad mbox, unknown message-id, missing branch: exit 2."""


class FetchError(InputError):
    """b4 could not produce a usable patch series (dead mirror, garbage mbox, ...)."""


class ToolError(KpatchtestError):
    """An external tool (git, make, qemu) failed where the user's input was fine: our
    bug or the machine's, so exit 3 with the command, its stderr and the traceback.
    Callers that know a failure is the user's (a missing ref) raise InputError instead."""

    exit_code = EXIT_INTERNAL


class GitError(ToolError):
    """A git command failed unexpectedly (see ToolError)."""
