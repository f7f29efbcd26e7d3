"""User-facing errors: the CLI shows their message as one clean line and exits, never a traceback."""

from __future__ import annotations


class PstarError(Exception):
    """A mistake the user can fix (bad config, missing file, impossible request).

    `exit_code` is what the `pstar` process exits with; 2 marks a config or input error.
    """

    exit_code = 2

    def __init__(self, message: str | list[str] = "") -> None:
        # a message of several lines (a failure and what to do about it) may be given as a list
        super().__init__(message if isinstance(message, str) else "\n".join(message))

    def message_lines(self) -> list[str]:
        """The lines the CLI prints after `error: `."""
        return str(self).splitlines() or [""]
